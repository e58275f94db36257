"""Our Partition SHAP against shap's Partition explainer (``shap.maskers.Image``) and against Owen
values computed by hand over the same hierarchy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from harness.xai.partition_shap import PartitionShap, split

TOL = 1e-5  # relative to max |value|; our maps are float32


class TinyNet(nn.Module):
    """A small CNN with a ``mean`` (for ``model_mean``), run one image at a time in float64 so that
    its outputs do not depend on how masked images are batched (ours and shap's batch differently)."""

    def __init__(self, corner: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                               nn.Linear(128, 5)).double()
        self.corner = corner  # only the top-left 4 x 4 pixels matter: many exact ties between regions
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        if self.corner:
            x = x[:, :, :4, :4]
        return torch.cat([self.f(x[i : i + 1]) for i in range(len(x))]).float()


def shap_maps(model: nn.Module, x: torch.Tensor, targets: list[int], masker: str, max_evals: int, batch_size: int,
              seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """shap's Partition explainer on each image, the global RNG seeded as our ``seed`` (its ties);
    ``scale``: shap sees the image times ``scale`` and the model divides it back."""
    import shap

    def f(b: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(b)).permute(0, 3, 1, 2).float() / scale
        return model(t).double().numpy()

    maps = []
    for img_t, target in zip(x, targets):
        img = img_t.permute(1, 2, 0).numpy().astype(np.float32) * scale
        if masker == "model_mean":
            value = np.broadcast_to(model.mean[0].permute(1, 2, 0).numpy(), img.shape).astype(np.float32)
        else:
            value = masker
        explainer = shap.Explainer(f, shap.maskers.Image(value, img.shape))
        np.random.seed(seed)
        sv = explainer(img[None], max_evals=max_evals, batch_size=batch_size, outputs=[target], silent=True)
        maps.append(sv.values[0, ..., 0].sum(-1))
    return np.stack(maps)


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert np.abs(ours - ref).max() <= TOL * np.abs(ref).max()


@pytest.mark.slow  # shap's numba JIT
@pytest.mark.parametrize(("masker", "max_evals", "batch_size", "corner"), [
    ("model_mean", 600, 64, True),    # only a corner matters: many regions with zero effect
    ("model_mean", 100, 256, False),  # the budget ends inside the first levels
    ("model_mean", 500, 16, False),   # shap's batch of 16 masks sets which entries are expanded
    ("model_mean", 2000, 7, False),   # an odd batch: a batch and the budget overrun by one mask
    ("blur(3,5)", 300, 32, False),
])
def test_equals_shap(masker, max_evals, batch_size, corner):
    model = TinyNet(corner).eval()
    x = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(1))  # odd halves: 12 -> 6 -> 3 -> 2 + 1
    ex = PartitionShap(max_evals=max_evals, masker=masker, batch_size=batch_size, seed=5)
    assert_close(ex(model, x, [1, 3]), shap_maps(model, x, [1, 3], masker, max_evals, batch_size, seed=5))


class TieNet(nn.Module):
    """``(sum of x * W)^2 / 100`` on an 8 x 8 image with integer weights, each quadrant's a
    permutation of the same numbers: regions of one size often have exactly equal effects but
    different insides, so which of them the budget expands (the tie-break) changes the map."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.RandomState(0)
        q = rng.randint(0, 4, size=48)
        w = np.zeros((3, 8, 8), dtype=np.float32)
        for r, c in [(0, 0), (0, 4), (4, 0), (4, 4)]:
            w[:, r : r + 4, c : c + 4] = rng.permutation(q).reshape(3, 4, 4)
        self.register_buffer("w", torch.from_numpy(w))
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.w).sum((1, 2, 3))  # sums of small integers: exact in float32
        return torch.stack([s * s / 100, s], 1)


@pytest.mark.slow  # shap's numba JIT
def test_ties_are_broken_as_shap_breaks_them():
    """shap orders entries of equal priority by ``np.random.randn()``, drawn four per expansion;
    ours draws the same numbers from ``RandomState(seed)``: equal to shap seeded alike, and the
    seed matters (at this budget a different seed moves the map)."""
    model, x = TieNet().eval(), torch.ones(1, 3, 8, 8)
    ours = PartitionShap(max_evals=100, masker="model_mean", batch_size=16, seed=5)(model, x, [0])
    assert_close(ours, shap_maps(model, x, [0], "model_mean", 100, 16, seed=5))
    other = shap_maps(model, x, [0], "model_mean", 100, 16, seed=6)
    assert np.abs(ours - other).max() > 1e-3 * np.abs(other).max()


@pytest.mark.slow  # shap's numba JIT
@pytest.mark.parametrize("masker", ["inpaint_telea", "inpaint_ns"])
def test_inpainting_equals_shap_on_the_0_255_scale(masker):
    """shap inpaints ``image.astype(uint8)``, meant for 0-255 images; ours scales a [0, 1] image to
    0-255 first. On an image of whole 0-255 steps the two agree."""
    model = TinyNet().eval()
    x = torch.floor(255 * torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(1))) / 255
    ex = PartitionShap(max_evals=200, masker=masker, batch_size=32)
    assert_close(ex(model, x, [1, 3]), shap_maps(model, x, [1, 3], masker, 200, 32, scale=255.0))


@pytest.mark.slow  # shap's numba JIT
def test_impl_shap_runs_shaps_explainer():
    model = TinyNet().eval()
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = PartitionShap(max_evals=120, batch_size=32)(model, x, [2])
    np.random.seed(0)
    assert_close(PartitionShap(max_evals=120, batch_size=32, impl="shap")(model, x, [2]), ours)


def owen_by_hand(f, shape: tuple[int, int, int]) -> np.ndarray:
    """Owen values over the binary hierarchy of :func:`split`: each leaf's marginal contribution,
    averaged over every choice of showing or hiding the sibling of each of its ancestors."""
    h, w, c = shape
    leaves: dict[tuple, list[tuple]] = {}  # leaf -> siblings of its ancestors (and of itself)

    def walk(box, sibs):
        halves = split(box)
        if halves is None:
            leaves[box] = sibs
            return
        walk(halves[0], sibs + [halves[1]])
        walk(halves[1], sibs + [halves[0]])

    walk((0, h, 0, w, 0, c), [])
    out = np.zeros((h, w))
    for leaf, sibs in leaves.items():
        total = 0.0
        for shown in itertools.product([False, True], repeat=len(sibs)):
            m = np.zeros((c, h, w), dtype=bool)
            for s, on in zip(sibs, shown):
                if on:
                    m[s[4] : s[5], s[0] : s[1], s[2] : s[3]] = True
            m1 = m.copy()
            m1[leaf[4] : leaf[5], leaf[0] : leaf[1], leaf[2] : leaf[3]] = True
            total += f(m1) - f(m)
        out[leaf[0], leaf[2]] += total / 2 ** len(sibs)
    return out


def test_full_hierarchy_gives_owen_values_by_hand():
    """With a budget for every node, the priority order no longer matters: the maps are the Owen
    values of the hierarchy, and they add up to f(x) - f(fill)."""
    model = TinyNet().eval()
    x = torch.rand(2, 3, 4, 3, generator=torch.Generator().manual_seed(4))
    fill = model.mean.expand_as(x[:1])
    a = PartitionShap(max_evals=100_000, batch_size=64)(model, x, [0, 4])
    for i, target in enumerate([0, 4]):
        def f(m, i=i, target=target):
            return float(model(torch.where(torch.from_numpy(m)[None], x[i : i + 1], fill))[0, target])
        ref = owen_by_hand(f, (4, 3, 3))
        assert_close(a[i], ref)
        np.testing.assert_allclose(a[i].sum(), f(np.ones((3, 4, 3), bool)) - f(np.zeros((3, 4, 3), bool)),
                                   rtol=1e-5)


def test_maps_do_not_depend_on_the_batch_of_images():
    model = TinyNet().eval()
    x = torch.rand(3, 3, 16, 12, generator=torch.Generator().manual_seed(1))
    ex = PartitionShap(max_evals=300, batch_size=50)
    together = ex(model, x, [0, 1, 2])
    for i in range(3):
        np.testing.assert_array_equal(ex(model, x[i : i + 1], [i])[0], together[i])


def test_settings_are_checked():
    from harness.types import HarnessError

    with pytest.raises(HarnessError, match="impl"):
        PartitionShap(impl="captum")
    with pytest.raises(HarnessError, match="blur"):
        PartitionShap(masker="blur(3)")
    with pytest.raises(HarnessError):
        PartitionShap(masker="median")
