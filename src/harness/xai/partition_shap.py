"""Partition SHAP: Owen values over a hierarchy of image halves, our own batched implementation
of shap's Partition explainer with its ``Image`` masker (``impl: shap`` runs shap's own)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.types import HarnessError
from harness.xai.base import Explainer, ModelCost, check_fill, fill_like

# A region of the hierarchy: rows [r0, r1), columns [c0, c1), channels [k0, k1) of an H x W x C image.
Box = tuple[int, int, int, int, int, int]


def split(box: Box) -> tuple[Box, Box] | None:
    """The two halves of ``box`` in shap's image hierarchy (``None`` for a single pixel channel):
    the rows when they are at least as many as the columns, else the columns, and the channels
    only once a region is one pixel. shap numbers the hierarchy's leaves from the end of the
    flattened image, so its first half is the far one, of size ``n // 2``."""
    r0, r1, c0, c1, k0, k1 = box
    h, w = r1 - r0, c1 - c0
    if h >= w and h > 1:
        m = r1 - h // 2
        return (m, r1, c0, c1, k0, k1), (r0, m, c0, c1, k0, k1)
    if w > 1:
        m = c1 - w // 2
        return (r0, r1, m, c1, k0, k1), (r0, r1, c0, m, k0, k1)
    if k1 - k0 > 1:
        m = k1 - (k1 - k0) // 2
        return (r0, r1, c0, c1, m, k1), (r0, r1, c0, c1, k0, m)
    return None


@dataclass
class _Game:
    """The Owen recursion of one image: a priority queue of (region, context) entries.

    An entry ``(on, f_off, f_on, box, weight)`` says: with the regions ``on`` shown (the context,
    a tuple of boxes), ``box`` moves the output from ``f_off`` to ``f_on``; ``weight`` is its share
    in the Owen value. Expanding it evaluates the context plus either half of ``box`` and queues
    each half in the context without and with its sibling, at half the weight; an entry left in
    the queue when the budget is spent (or a leaf) credits ``weight * (f_on - f_off)`` to its box.
    """

    budget: int
    batch_size: int
    rng: np.random.RandomState
    credit: dict[Box, float] = field(default_factory=dict)
    queue: list[Any] = field(default_factory=list)
    evals: int = 0
    done: bool = False
    pending: list[Any] = field(default_factory=list)
    _count: int = 0

    def push(self, priority: float, tie: float, entry: tuple) -> None:
        heapq.heappush(self.queue, (priority, tie, self._count, entry))
        self._count += 1

    def add(self, box: Box, value: float) -> None:
        self.credit[box] = self.credit.get(box, 0.0) + value

    def next_masks(self) -> list[tuple[Box, ...]]:
        """Pop the entries of the next model call (shap's batching: up to ``batch_size`` masks
        and the budget) and return their masks, each a tuple of shown boxes."""
        self.pending = []
        if self.evals >= self.budget:  # budget spent: the rest stays on the queued regions
            while self.queue:
                _, f00, f11, box, w = heapq.heappop(self.queue)[3]
                self.add(box, (f11 - f00) * w)
            self.done = True
            return []
        masks: list[tuple[Box, ...]] = []
        while self.queue and len(masks) < self.batch_size and self.evals + len(masks) < self.budget:
            on, f00, f11, box, w = heapq.heappop(self.queue)[3]
            halves = split(box)
            if halves is None:
                self.add(box, (f11 - f00) * w)
                continue
            left, right = halves
            self.pending.append((on, f00, f11, box, w, left, right))
            masks.append((*on, left))
            masks.append((*on, right))
        if not masks:
            self.done = True
        self.evals += len(masks)
        return masks

    def update(self, f: np.ndarray) -> None:
        """Queue the halves of the popped entries, given the outputs of their masks."""
        ties = self.rng.randn(4 * len(self.pending))
        for i, (on, f00, f11, _, w, left, right) in enumerate(self.pending):
            f10, f01 = float(f[2 * i]), float(f[2 * i + 1])
            w2 = w / 2
            t = ties[4 * i : 4 * i + 4]
            self.push(-abs(f10 - f00) * w2, t[0], (on, f00, f10, left, w2))
            self.push(-abs(f01 - f00) * w2, t[1], (on, f00, f01, right, w2))
            self.push(-abs(f11 - f01) * w2, t[2], ((*on, right), f01, f11, left, w2))
            self.push(-abs(f11 - f10) * w2, t[3], ((*on, left), f10, f11, right, w2))
        self.pending = []

    def map(self, h: int, w: int) -> np.ndarray:
        """The attribution per pixel: each region's credit spread evenly over its pixel channels
        and summed over channels."""
        out = np.zeros((h, w))
        for (r0, r1, c0, c1, k0, k1), v in self.credit.items():
            out[r0:r1, c0:c1] += v / ((r1 - r0) * (c1 - c0))
        return out


class PartitionShap(Explainer):
    """Owen values over shap's hierarchy of image halves (shap's Partition explainer with
    ``shap.maskers.Image``), batched over masks and images.

    The image (H x W x C) is split recursively into halves: along the rows when they are at least
    as many as the columns, else along the columns, the channels last. Starting from the whole
    image, the entry with the largest ``|effect| * weight`` is expanded next (ties broken by a
    seeded normal draw, as shap does with its global RNG); each expansion costs two model
    evaluations, and when ``max_evals - 2`` are spent each region still queued keeps its effect.
    A region's credit is spread evenly over its pixels; a map sums (over pixels) to
    ``f(x) - f(masked x)``. The images of a call advance together so that their masks share model
    calls of ``batch_size``; each image follows shap's own batching, so maps do not depend on the
    batch.

    References:
        Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017;
        the shap package's Partition explainer (Owen values: Owen, "Values of games with a
        priori unions", 1977).

    Args:
        max_evals: model evaluations per image (shap's ``max_evals``).
        masker: ``model_mean``, ``mean`` or a pixel value (constant fill), or one of shap's
            image masks: ``blur(kx,ky)`` (a box blur of the image, OpenCV's), ``inpaint_telea``,
            ``inpaint_ns`` (OpenCV inpainting of the hidden pixels, on the 0-255 scale).
        batch_size: masks per model call (and shap's ``batch_size``, which sets the order).
        impl: ``harness`` (ours) or ``shap`` (shap's explainer, one image at a time).
        seed: tie-breaking draws (ours; shap uses the global numpy RNG).
    """

    def __init__(self, max_evals: int = 500, masker: float | str = "model_mean", batch_size: int = 256,
                 impl: str = "harness", seed: int = 0) -> None:
        self.max_evals = int(max_evals)
        shap_masks = isinstance(masker, str) and (masker.startswith("blur(") or masker.startswith("inpaint_"))
        if shap_masks and masker not in ("inpaint_telea", "inpaint_ns"):
            try:
                kernel = tuple(int(k) for k in masker[5:-1].split(","))
                assert masker.endswith(")") and len(kernel) == 2 and min(kernel) > 0
            except (ValueError, AssertionError):
                raise HarnessError(f"xai.masker={masker!r} is not valid: blur(kx,ky) with positive sizes") from None
        self.masker = masker if shap_masks else check_fill(masker, "xai.masker")
        self.batch_size = int(batch_size)
        if impl not in ("harness", "shap"):
            raise HarnessError(f"xai.impl={impl!r} is not valid: harness or shap")
        self.impl = impl
        self.seed = int(seed)

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """shap evaluates the model on (at most) ``max_evals`` masked images."""
        return ModelCost(forward=self.max_evals)

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.impl == "shap":
            return self._explain_shap(model, x, targets)
        n, c, h, w = x.shape
        inpaint = isinstance(self.masker, str) and self.masker.startswith("inpaint_")
        # masked images are made in NHWC memory and reach the model as channels_last tensors, as
        # shap's numpy images do (CNNs on CPU run faster so)
        xh = x.permute(0, 2, 3, 1).contiguous()
        fill = None if inpaint else self._fill(model, x).permute(0, 2, 3, 1).contiguous()
        t = targets.to(x.device)

        @torch.no_grad()
        def f(images_hwc: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
            images = images_hwc.permute(0, 3, 1, 2)
            out = [model(images[s : s + self.batch_size]).gather(1, rows[s : s + self.batch_size, None])
                   for s in range(0, len(images), self.batch_size)]
            return torch.cat(out)[:, 0].double().cpu().numpy()

        # f(all hidden) and f(x) for every image, in one call
        hidden = self._inpaint(xh, torch.zeros_like(xh, dtype=torch.bool)) if inpaint else fill
        both = f(torch.cat([hidden, xh]), torch.cat([t, t]))
        games = [_Game(self.max_evals - 2, self.batch_size, np.random.RandomState(self.seed)) for _ in range(n)]
        root: Box = (0, h, 0, w, 0, c)
        for i, g in enumerate(games):
            g.push(0.0, 0.0, ((), float(both[i]), float(both[n + i]), root, 1.0))
        while True:
            per_game = [(i, g.next_masks()) for i, g in enumerate(games) if not g.done]
            per_game = [(i, m) for i, m in per_game if m]
            if not per_game:
                break
            img = torch.tensor([i for i, m in per_game for _ in m], device=x.device)
            mask = self._rasterise([b for _, m in per_game for b in m], (h, w, c), x.device)
            if inpaint:
                images = self._inpaint(xh[img], mask.expand(-1, -1, -1, c))
            else:
                images = torch.where(mask, xh[img], fill[img])
            out, s = f(images, t[img]), 0
            for i, m in per_game:
                games[i].update(out[s : s + len(m)])
                s += len(m)
        return torch.from_numpy(np.stack([g.map(h, w) for g in games])).float()

    @staticmethod
    def _rasterise(masks: list[tuple[Box, ...]], shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """Boolean ``[B, H, W, C]`` masks (``[B, H, W, 1]`` while no box splits the channels), each
        the union of its boxes (padded with empty boxes)."""
        depth = max(len(m) for m in masks)
        boxes = np.zeros((len(masks), depth, 6), dtype=np.int64)
        for j, m in enumerate(masks):
            boxes[j, : len(m)] = m
        h, w, c = shape
        empty = boxes[:, :, 0] == boxes[:, :, 1]
        if (empty | ((boxes[:, :, 4] == 0) & (boxes[:, :, 5] == c))).all():
            boxes[:, :, 4:6], shape = (0, 1), (h, w, 1)  # every box spans all channels
        b = torch.from_numpy(boxes).to(device)
        ar = [torch.arange(k, device=device) for k in shape]
        out = torch.zeros((len(masks), *shape), dtype=torch.bool, device=device)
        for d in range(depth):
            rows, cols, chans = ((a >= b[:, d, 2 * j, None]) & (a < b[:, d, 2 * j + 1, None]) for j, a in enumerate(ar))
            out |= rows[:, :, None, None] & cols[:, None, :, None] & chans[:, None, None, :]
        return out

    def _fill(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The image shown where regions are hidden: a constant fill or shap's blur of each image."""
        if isinstance(self.masker, str) and self.masker.startswith("blur("):
            import cv2

            kernel = tuple(int(k) for k in self.masker[5:-1].split(","))
            imgs = x.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            blurred = np.stack([cv2.blur(im, kernel).reshape(im.shape) for im in imgs])
            return torch.from_numpy(blurred).permute(0, 3, 1, 2).to(x)
        return fill_like(model, x, self.masker, "xai.masker")

    def _inpaint(self, x: torch.Tensor, shown: torch.Tensor) -> torch.Tensor:
        """shap's inpainting on ``[B, H, W, C]`` images and masks: a pixel with any channel hidden
        is inpainted by OpenCV (radius 3) from the image on the 0-255 scale (cast to uint8, as shap
        does), the others keep their value; with every pixel hidden, each channel's mean."""
        import cv2

        flag = cv2.INPAINT_TELEA if self.masker == "inpaint_telea" else cv2.INPAINT_NS
        imgs = x.cpu().numpy().astype(np.float32)
        hide = (~shown).any(-1).cpu().numpy()
        out = imgs.copy()
        for j, (im, m) in enumerate(zip(imgs, hide)):
            if m.all():
                out[j] = im.mean((0, 1))
            elif m.any():
                painted = cv2.inpaint((im * 255).astype(np.uint8), m.astype(np.uint8), 3, flag)
                out[j][m] = painted.reshape(im.shape)[m].astype(np.float32) / 255
        return torch.from_numpy(out).to(x)

    def _explain_shap(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """shap's own Partition explainer, one image at a time (``impl: shap``)."""
        import shap

        dev = x.device

        def f(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                t = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(dev, torch.float32)
                return model(t).double().cpu().numpy()

        maps = []
        for i, target in enumerate(targets.tolist()):
            img = x[i].permute(1, 2, 0).cpu().numpy().astype(np.float32)
            if isinstance(self.masker, str) and not self.masker.endswith("mean"):
                mask_value: str | np.ndarray = self.masker
            else:
                mask_value = fill_like(model, x[i : i + 1], self.masker, "xai.masker")[0].permute(1, 2, 0).cpu().numpy()
            explainer = shap.Explainer(f, shap.maskers.Image(mask_value, img.shape))
            sv = explainer(img[None], max_evals=self.max_evals, batch_size=self.batch_size,
                           outputs=[target], silent=True)
            maps.append(torch.from_numpy(np.asarray(sv.values[0, ..., 0]).sum(-1)).float())
        return torch.stack(maps)
