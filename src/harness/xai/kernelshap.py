"""KernelSHAP on superpixels: the SHAP kernel regression, vectorised and batched."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import nn

from harness.xai.base import Explainer, ModelCost, check_fill, fill_like, image_seed
from harness.xai.superpixels import segment


def coalitions(m: int, n_samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Coalitions ``[S, m]`` (bool) and their regression weights ``[S]``.

    When every non-trivial coalition fits in ``n_samples`` they are all enumerated with the exact
    Shapley-kernel weights, and the regression returns the exact Shapley values. Otherwise sizes
    are drawn in proportion to the kernel's total weight per size, members uniformly, each with
    its complement (paired sampling), and all weights are 1.
    """
    if m <= 1:
        return np.zeros((0, m), bool), np.zeros(0)
    if 2**m - 2 <= n_samples:
        z = np.array([c for c in itertools.product([False, True], repeat=m) if 0 < sum(c) < m])
        s = z.sum(1)
        w = (m - 1) / (np.array([math.comb(m, k) for k in s]) * s * (m - s))
        return z, w
    sizes = np.arange(1, m)
    p = (m - 1) / (sizes * (m - sizes))
    half = max(1, n_samples // 2)
    drawn = rng.choice(sizes, size=half, p=p / p.sum())
    z = np.zeros((half, m), bool)
    for i, k in enumerate(drawn):
        z[i, rng.choice(m, size=k, replace=False)] = True
    return np.concatenate([z, ~z]), np.ones(2 * half)


def n_coalitions(m: int, n_samples: int) -> int:
    """How many coalitions :func:`coalitions` returns for ``m`` players and ``n_samples``."""
    if m <= 1:
        return 0
    if 2**m - 2 <= n_samples:
        return 2**m - 2
    return 2 * max(1, n_samples // 2)


def solve(z: np.ndarray, w: np.ndarray, f: np.ndarray, f_empty: float, f_full: float) -> np.ndarray:
    """Weighted least squares for the Shapley values under the efficiency constraint
    ``sum(phi) = f_full - f_empty`` (eliminating the last player)."""
    m = z.shape[1]
    delta = f_full - f_empty
    if m == 1:
        return np.array([delta])
    zf = z.astype(np.float64)
    x = zf[:, :-1] - zf[:, -1:]
    y = f - f_empty - zf[:, -1] * delta
    sw = np.sqrt(w)[:, None]
    phi, *_ = np.linalg.lstsq(x * sw, y * sw[:, 0], rcond=None)
    return np.append(phi, delta - phi.sum())


class KernelShap(Explainer):
    """Shapley values of superpixels estimated by KernelSHAP.

    Absent superpixels take the ``baseline`` fill; the value function is the target logit. All
    coalition images of an image go through the model ``batch_size`` at a time. With few
    superpixels (``2^M - 2 <= n_samples``) every coalition is enumerated and the values are
    exact; otherwise coalitions are sampled (paired), seeded per image from ``seed`` and the image
    bytes. The efficiency constraint holds exactly: a map sums (over superpixels) to
    ``f(x) - f(baseline)``.

    References:
        Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017.
        Covert & Lee, "Improving KernelSHAP", AISTATS 2021 (paired sampling).

    Args:
        n_samples: coalitions evaluated per image.
        segmentation, n_segments, patch: superpixels (see :mod:`harness.xai.superpixels`).
        baseline: fill of absent superpixels: ``model_mean``, ``mean`` or a pixel value.
        batch_size: perturbed images per model call.
        seed: base seed.
    """

    def __init__(self, n_samples: int = 500, segmentation: str = "slic", n_segments: int = 50,
                 patch: int = 4, baseline: float | str = "model_mean", batch_size: int = 256,
                 seed: int = 0) -> None:
        self.n_samples = int(n_samples)
        self.segmentation = segmentation
        self.n_segments = int(n_segments)
        self.patch = int(patch)
        self.baseline = check_fill(baseline, "xai.baseline")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        segment(np.zeros((8, 8, 3)), segmentation, n_segments=4, patch=4)  # validate early

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """The coalition images plus the image and its baseline. The superpixel count is exact
        for ``grid``; for SLIC it is taken as ``n_segments`` and for quickshift as large, which
        only matters when all ``2^M - 2`` coalitions would fit in ``n_samples`` (M <= 8 at 500)."""
        h, w = image_size
        if self.segmentation == "grid":
            m = -(-h // self.patch) * -(-w // self.patch)
        elif self.segmentation == "slic":
            m = min(self.n_segments, h * w)
        else:
            m = h * w
        return ModelCost(forward=n_coalitions(m, self.n_samples) + 2)

    @torch.no_grad()
    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        fill = fill_like(model, x, self.baseline, "xai.baseline")
        ends = model(torch.cat([x, fill])).double().cpu()
        maps = []
        for i, target in enumerate(targets.tolist()):
            img = x[i].permute(1, 2, 0).cpu().numpy().astype(np.float32)
            seed = image_seed(self.seed, img)
            segs = segment(img, self.segmentation, n_segments=self.n_segments, patch=self.patch, seed=seed)
            m = int(segs.max()) + 1
            z, w = coalitions(m, self.n_samples, np.random.default_rng(seed))
            seg_t = torch.from_numpy(segs).to(x.device)
            f = []
            for s in range(0, len(z), self.batch_size):
                keep = torch.from_numpy(z[s : s + self.batch_size]).to(x.device)[:, seg_t][:, None]
                imgs = torch.where(keep, x[i : i + 1], fill[i : i + 1])
                f.append(model(imgs)[:, target].double().cpu())
            f_all = torch.cat(f).numpy() if f else np.zeros(0)
            phi = solve(z, w, f_all, float(ends[len(x) + i, target]), float(ends[i, target]))
            maps.append(torch.from_numpy(phi[segs]).float())
        return torch.stack(maps)
