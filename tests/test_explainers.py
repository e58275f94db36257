import numpy as np
import pytest
import torch
from torch import nn

from harness.models.classifier import Classifier
from harness.xai.integrated_gradients import IntegratedGradients
from harness.xai.random import RandomExplainer


def smooth_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    return Classifier(net, input_size=8).eval()


def test_random_is_deterministic_batch_invariant_and_shaped():
    x = torch.rand(4, 3, 8, 8)
    ex = RandomExplainer(seed=1)
    a = ex(None, x, [0, 1, 2, 0])
    assert a.shape == (4, 8, 8) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, ex(None, x, [0, 1, 2, 0]))
    np.testing.assert_array_equal(a[2:3], ex(None, x[2:3], [2]))
    assert not np.array_equal(a, RandomExplainer(seed=2)(None, x, [0, 1, 2, 0]))


def test_ig_completeness_and_batch_invariance():
    """IG sums to f(x) - f(baseline) (Sundararajan et al., completeness axiom)."""
    model = smooth_model()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 2, 1])
    ex = IntegratedGradients(n_steps=64, baseline=0.0)
    a = ex(model, x, t)
    assert a.shape == (3, 8, 8) and np.isfinite(a).all()
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x))).gather(1, t[:, None])[:, 0].numpy()
    np.testing.assert_allclose(a.sum((1, 2)), gap, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(ex(model, x[1:2], t[1:2])[0], a[1], rtol=1e-4, atol=1e-6)


def test_explainer_rejects_mismatched_targets():
    with pytest.raises(ValueError, match="targets"):
        RandomExplainer()(None, torch.rand(2, 3, 8, 8), [0])
