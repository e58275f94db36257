"""LIME and KernelSHAP against answers known by hand."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from harness.models.classifier import Classifier
from harness.xai.kernelshap import KernelShap
from harness.xai.lime import Lime
from harness.xai.superpixels import segment, top_k_mask


class CellGame(nn.Module):
    """Logit 0 = a nonlinear game of the four 16x16 cells' mean brightness (with interactions)."""

    def forward(self, x):
        c = x.mean(1).reshape(len(x), 2, 16, 2, 16).mean((2, 4)).reshape(len(x), 4)
        v = 3 * c[:, 0] - c[:, 1] + 2 * c[:, 2] * c[:, 3] + torch.sin(c[:, 0] * c[:, 1] * 4)
        return torch.stack([v, -v], 1)


def exact_shapley(value, m):
    phi = np.zeros(m)
    for j in range(m):
        others = [k for k in range(m) if k != j]
        for r in range(m):
            for s in itertools.combinations(others, r):
                wgt = math.factorial(r) * math.factorial(m - r - 1) / math.factorial(m)
                phi[j] += wgt * (value(set(s) | {j}) - value(set(s)))
    return phi


def test_kernelshap_equals_exact_shapley_values_when_enumerable():
    model = Classifier(CellGame(), input_size=32, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    segs = segment(np.zeros((32, 32, 3)), "grid", patch=16)
    a = KernelShap(n_samples=100, segmentation="grid", patch=16, baseline=0.0)(model, x, [0, 0])
    for i in range(2):
        def value(present):
            keep = torch.from_numpy(np.isin(segs, list(present)))
            with torch.no_grad():
                return float(model(torch.where(keep, x[i], torch.zeros(()))[None])[0, 0])
        expected = exact_shapley(value, 4)
        got = np.array([a[i][segs == j][0] for j in range(4)])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_kernelshap_sampled_keeps_efficiency_and_tracks_exact_values():
    model = Classifier(CellGame(), input_size=32, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grid = KernelShap(n_samples=400, segmentation="grid", patch=4, baseline=0.0)
    a = grid(model, x, [0])[0]
    with torch.no_grad():
        gap = float(model(x)[0, 0] - model(torch.zeros_like(x))[0, 0])
    assert a.reshape(8, 4, 8, 4).mean((1, 3)).sum() == pytest.approx(gap, rel=1e-4)  # one value per cell


def test_lime_recovers_a_linear_model_ranking_and_top_k_mask():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, generator=g)

    class Cells(nn.Module):
        def forward(self, x):
            c = x.mean(1).reshape(len(x), 2, 16, 2, 16).mean((2, 4)).reshape(len(x), 4)
            v = c @ w
            return torch.stack([v, -v], 1)

    model = Classifier(Cells(), input_size=32, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    x = torch.rand(1, 3, 32, 32, generator=g)
    lime = Lime(num_samples=300, segmentation="grid", patch=16, hide=0.0, output="logit")
    a = lime(model, x, [0])[0]
    segs = segment(np.zeros((32, 32, 3)), "grid", patch=16)
    weights = np.array([a[segs == j][0] for j in range(4)])
    true = (w * x.mean(1).reshape(2, 16, 2, 16).mean((1, 3)).reshape(4)).numpy()  # contribution of each cell
    assert np.corrcoef(weights, true)[0, 1] > 0.99
    top = top_k_mask(a, segs, k=1, positive_only=False)
    assert top[segs == int(np.argmax(true))].all() and top.sum() == 256


def test_partition_shap_is_efficient_and_accepts_shap_maskers():
    from harness.xai.partition_shap import PartitionShap

    model = Classifier(CellGame(), input_size=32, mean=(0.5, 0.5, 0.5), std=(1, 1, 1)).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    a = PartitionShap(max_evals=200)(model, x, [0, 1])
    with torch.no_grad():
        gap = (model(x) - model(torch.full_like(x, 0.5))).gather(1, torch.tensor([[0], [1]]))[:, 0]
    np.testing.assert_allclose(a.sum((1, 2)), gap.numpy(), rtol=1e-4, atol=1e-5)  # Owen values add up
    blurred = PartitionShap(max_evals=100, masker="blur(8,8)")(model, x[:1], [0])
    assert blurred.shape == (1, 32, 32) and np.isfinite(blurred).all()


def test_occlusion_auto_patch_scales_with_the_input():
    from harness.types import HarnessError
    from harness.xai.occlusion import Occlusion

    occ = Occlusion()
    assert occ.sizes(32, 32) == (4, 4) and occ.sizes(224, 224) == (28, 28)
    assert len(occ.windows(224, 224)) == len(occ.windows(32, 32)) == 64
    assert Occlusion(patch=6, stride="auto").sizes(224, 224) == (6, 6)
    with pytest.raises(HarnessError, match="positive number of pixels or auto"):
        Occlusion(patch="big")
