"""Occlusion: the drop of the target logit when a square patch is replaced."""

from __future__ import annotations

import torch
from torch import nn

from harness.types import HarnessError
from harness.xai.base import Explainer, ModelCost, check_fill, fill_like


class Occlusion(Explainer):
    """Slide a ``patch``-sized square over the image with ``stride``, replace it, and credit the
    drop of the target logit to every pixel it covered (averaged where windows overlap).

    All occluded images of a batch go through the model ``batch_size`` at a time, so the cost is
    the ``N × windows`` forward passes the algorithm needs.

    References:
        Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014.

    Args:
        patch: side of the occluding square in pixels.
        stride: step between windows (``patch`` gives a tiling).
        baseline: fill: ``"model_mean"``, ``"mean"`` or a pixel value in [0, 1].
        batch_size: occluded images per model call.
    """

    def __init__(self, patch: int = 4, stride: int = 4, baseline: float | str = "model_mean",
                 batch_size: int = 512) -> None:
        if patch < 1 or stride < 1:
            raise HarnessError("xai.patch and xai.stride must be positive")
        self.patch, self.stride = int(patch), int(stride)
        self.baseline = check_fill(baseline, "xai.baseline")
        self.batch_size = int(batch_size)

    def windows(self, h: int, w: int) -> list[tuple[int, int]]:
        """Top-left corners of the occluding squares on an ``h`` × ``w`` image: every ``stride``,
        plus the last row and column of windows so that the borders are covered too."""
        if self.patch > min(h, w):
            raise HarnessError(f"xai.patch={self.patch} is larger than the {h}x{w} input")
        ys = list(range(0, h - self.patch + 1, self.stride))
        xs = list(range(0, w - self.patch + 1, self.stride))
        if ys[-1] != h - self.patch:
            ys.append(h - self.patch)  # cover the last rows and columns too
        if xs[-1] != w - self.patch:
            xs.append(w - self.patch)
        return [(i, j) for i in ys for j in xs]

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """One forward per window plus one for the unoccluded image."""
        return ModelCost(forward=len(self.windows(*image_size)) + 1)

    @torch.no_grad()
    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        windows = self.windows(h, w)
        ref = fill_like(model, x, self.baseline, "xai.baseline")
        base = model(x).gather(1, targets[:, None])[:, 0]
        drops = torch.empty(len(windows), n, dtype=x.dtype, device=x.device)
        per_call = max(1, self.batch_size // n)
        for s in range(0, len(windows), per_call):
            chunk = windows[s : s + per_call]
            imgs = x.repeat(len(chunk), 1, 1, 1)
            for k, (i, j) in enumerate(chunk):
                sl = (slice(k * n, (k + 1) * n), slice(None), slice(i, i + self.patch), slice(j, j + self.patch))
                imgs[sl] = ref[:, :, i : i + self.patch, j : j + self.patch]
            out = model(imgs).gather(1, targets.repeat(len(chunk))[:, None])[:, 0]
            drops[s : s + len(chunk)] = (base.repeat(len(chunk)) - out).view(len(chunk), n)
        total = torch.zeros(n, h, w, dtype=x.dtype, device=x.device)
        count = torch.zeros(h, w, dtype=x.dtype, device=x.device)
        for k, (i, j) in enumerate(windows):
            total[:, i : i + self.patch, j : j + self.patch] += drops[k].view(n, 1, 1)
            count[i : i + self.patch, j : j + self.patch] += 1
        return total / count.clamp_min(1)
