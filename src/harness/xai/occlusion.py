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
        patch: side of the occluding square in pixels, or ``auto``: an eighth of the shorter image
            side (4 px at 32 px, 28 px at 224 px), so the cost is about 64 windows per image at
            any resolution.
        stride: step between windows in pixels, or ``auto``: equal to the patch (a tiling).
        baseline: fill: ``"model_mean"``, ``"mean"`` or a pixel value in [0, 1].
        batch_size: occluded images per model call.
    """

    def __init__(self, patch: int | str = "auto", stride: int | str = "auto",
                 baseline: float | str = "model_mean", batch_size: int = 512) -> None:
        for name, v in (("patch", patch), ("stride", stride)):
            if v != "auto" and (isinstance(v, str) or int(v) < 1):
                raise HarnessError(f"xai.{name}={v!r} is not valid: a positive number of pixels or auto")
        self.patch = patch if patch == "auto" else int(patch)
        self.stride = stride if stride == "auto" else int(stride)
        self.baseline = check_fill(baseline, "xai.baseline")
        self.batch_size = int(batch_size)

    def windows(self, h: int, w: int) -> list[tuple[int, int]]:
        """Top-left corners of the occluding squares on an ``h`` × ``w`` image: every ``stride``,
        plus the last row and column of windows so that the borders are covered too."""
        patch, stride = self.sizes(h, w)
        if patch > min(h, w):
            raise HarnessError(f"xai.patch={patch} is larger than the {h}x{w} input")
        ys = list(range(0, h - patch + 1, stride))
        xs = list(range(0, w - patch + 1, stride))
        if ys[-1] != h - patch:
            ys.append(h - patch)  # cover the last rows and columns too
        if xs[-1] != w - patch:
            xs.append(w - patch)
        return [(i, j) for i in ys for j in xs]

    def sizes(self, h: int, w: int) -> tuple[int, int]:
        """Patch side and stride in pixels for an ``h`` × ``w`` image (``auto`` resolved)."""
        patch = max(1, round(min(h, w) / 8)) if self.patch == "auto" else self.patch
        return patch, patch if self.stride == "auto" else self.stride

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """One forward per window plus one for the unoccluded image."""
        return ModelCost(forward=len(self.windows(*image_size)) + 1)

    @torch.no_grad()
    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        windows = self.windows(h, w)
        patch, _ = self.sizes(h, w)
        ref = fill_like(model, x, self.baseline, "xai.baseline")
        base = model(x).gather(1, targets[:, None])[:, 0]
        drops = torch.empty(len(windows), n, dtype=x.dtype, device=x.device)
        per_call = max(1, self.batch_size // n)
        for s in range(0, len(windows), per_call):
            chunk = windows[s : s + per_call]
            imgs = x.repeat(len(chunk), 1, 1, 1)
            for k, (i, j) in enumerate(chunk):
                sl = (slice(k * n, (k + 1) * n), slice(None), slice(i, i + patch), slice(j, j + patch))
                imgs[sl] = ref[:, :, i : i + patch, j : j + patch]
            out = model(imgs).gather(1, targets.repeat(len(chunk))[:, None])[:, 0]
            drops[s : s + len(chunk)] = (base.repeat(len(chunk)) - out).view(len(chunk), n)
        total = torch.zeros(n, h, w, dtype=x.dtype, device=x.device)
        count = torch.zeros(h, w, dtype=x.dtype, device=x.device)
        for k, (i, j) in enumerate(windows):
            total[:, i : i + patch, j : j + patch] += drops[k].view(n, 1, 1)
            count[i : i + patch, j : j + patch] += 1
        return total / count.clamp_min(1)
