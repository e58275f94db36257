"""What the multimodal LLM is shown: the image with its explanation drawn on it.

Each renderer (config group ``render``) is called as ``renderer(image, attribution)`` with an
``[H, W, 3]`` float image in [0, 1] and an ``[H, W]`` attribution map, and returns the list of
PIL images to send (one, or two for ``side_by_side`` with ``tiled: false``). Every image is
enlarged to ``size`` pixels on its shorter side (nearest neighbour, so marked pixels stay exact)
because multimodal LLMs read small images poorly (LLaVA-1.5 sees 336 px).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from PIL import Image, ImageDraw

from harness.types import HarnessError


def _to_pil(img: np.ndarray, size: int | None) -> Image.Image:
    out = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    if size and min(out.size) != size:
        scale = size / min(out.size)
        out = out.resize((round(out.width * scale), round(out.height * scale)), Image.Resampling.NEAREST)
    return out


def top_share_mask(attribution: np.ndarray, share: float) -> np.ndarray:
    """The ``round(share * H * W)`` pixels of highest attribution (ties broken by pixel order)."""
    a = np.asarray(attribution, dtype=np.float64).ravel()
    k = int(round(float(share) * a.size))
    mask = np.zeros(a.size, bool)
    mask[np.argsort(-a, kind="stable")[:k]] = True
    return mask.reshape(np.shape(attribution))


def _check_share(share: float, what: str) -> float:
    if not 0 < float(share) <= 1:
        raise HarnessError(f"{what}={share} must be in (0, 1]")
    return float(share)


class Renderer:
    """Base: ``size`` (shorter side of the images sent, ``null``: the model's input size)."""

    n_images: ClassVar[int] = 1
    kind: ClassVar[str] = "image"

    def __init__(self, size: int | None = 336) -> None:
        self.size = None if size is None else int(size)

    def __call__(self, image: np.ndarray, attribution: np.ndarray) -> list[Image.Image]:
        raise NotImplementedError

    @staticmethod
    def _check(image: np.ndarray, attribution: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        img = np.asarray(image, dtype=np.float64)
        if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
            img = img.transpose(1, 2, 0)
        a = np.nan_to_num(np.asarray(attribution, dtype=np.float64))
        if img.shape[:2] != a.shape:
            raise ValueError(f"image {img.shape} and attribution {a.shape} differ in size")
        return img, a


class Boundaries(Renderer):
    """LIME's figure: outline the most relevant superpixels, optionally dim the rest.

    Superpixels (``segmentation``, as the ``lime`` explainer makes them) are ranked by their mean
    attribution; the marked region is the ``top_k`` best with positive weight, or, with
    ``mass`` set, the fewest best superpixels that hold that share of the positive attribution
    mass. Its outline is drawn in ``color``; pixels outside are blended towards grey by ``dim``
    (0: untouched).

    References:
        Ribeiro, Singh & Guestrin, "'Why Should I Trust You?': Explaining the Predictions of Any
        Classifier", KDD 2016 (Figure 4: the marked superpixels).
    """

    def __init__(self, top_k: int = 5, mass: float | None = None, segmentation: str = "slic", n_segments: int = 50,
                 patch: int = 4, color: tuple[float, float, float] | list[float] = (1.0, 1.0, 0.0), dim: float = 0.0,
                 size: int | None = 336) -> None:
        super().__init__(size)
        self.top_k = int(top_k)
        self.mass = None if mass is None else _check_share(mass, "render.mass")
        self.segmentation, self.n_segments, self.patch = segmentation, int(n_segments), int(patch)
        self.color = np.asarray(color, dtype=np.float64)
        self.dim = float(dim)

    def region(self, image: np.ndarray, attribution: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(marked mask, superpixel labels)`` for one image."""
        from harness.xai.superpixels import segment

        segments = segment(image, self.segmentation, n_segments=self.n_segments, patch=self.patch)
        ids = np.unique(segments)
        means = np.array([attribution[segments == i].mean() for i in ids])
        order = [i for i in ids[np.argsort(-means, kind="stable")] if means[np.searchsorted(ids, i)] > 0]
        if self.mass is not None:
            mass = np.array([np.clip(attribution[segments == i], 0, None).sum() for i in order])
            total = np.clip(attribution, 0, None).sum()
            k = int(np.searchsorted(np.cumsum(mass), self.mass * total - 1e-12) + 1) if total > 0 else 0
            chosen = order[:k]
        else:
            chosen = order[: self.top_k]
        return np.isin(segments, chosen), segments

    def __call__(self, image: np.ndarray, attribution: np.ndarray) -> list[Image.Image]:
        from skimage.segmentation import find_boundaries

        img, a = self._check(image, attribution)
        marked, _ = self.region(img, a)
        out = img.copy()
        if self.dim:
            out[~marked] = out[~marked] * (1 - self.dim) + 0.5 * self.dim
        out[find_boundaries(marked, mode="inner")] = self.color
        return [_to_pil(out, self.size)]


class Heatmap(Renderer):
    """The attribution as a colour map over the image (``cmap``, ``alpha``; positive relevance
    only with ``positive_only``)."""

    def __init__(self, alpha: float = 0.5, cmap: str = "jet", positive_only: bool = True, size: int | None = 336) -> None:
        super().__init__(size)
        self.alpha, self.cmap, self.positive_only = float(alpha), str(cmap), bool(positive_only)

    def heat(self, img: np.ndarray, a: np.ndarray) -> np.ndarray:
        from matplotlib import colormaps

        from harness.render.overlay import normalise

        if self.cmap not in colormaps:
            raise HarnessError(f"render.cmap={self.cmap!r} is not a matplotlib colour map")
        v = normalise(np.clip(a, 0, None) if self.positive_only else a)
        v = v if self.positive_only else (v + 1) / 2
        return img * (1 - self.alpha) + colormaps[self.cmap](v)[..., :3] * self.alpha

    def __call__(self, image: np.ndarray, attribution: np.ndarray) -> list[Image.Image]:
        img, a = self._check(image, attribution)
        return [_to_pil(self.heat(img, a), self.size)]


class Masked(Renderer):
    """Keep the top ``share`` of pixels by attribution, grey (``fill``) the rest."""

    def __init__(self, share: float = 0.2, fill: float = 0.5, size: int | None = 336) -> None:
        super().__init__(size)
        self.share = _check_share(share, "render.share")
        self.fill = float(fill)

    def __call__(self, image: np.ndarray, attribution: np.ndarray) -> list[Image.Image]:
        img, a = self._check(image, attribution)
        keep = top_share_mask(a, self.share)
        out = np.where(keep[..., None], img, self.fill)
        return [_to_pil(out, self.size)]


class SideBySide(Heatmap):
    """The original and the heatmap: two images in one request (``tiled: false``, for models
    that take several images), or tiled into one."""

    def __init__(self, tiled: bool = True, alpha: float = 0.5, cmap: str = "jet", positive_only: bool = True,
                 size: int | None = 336) -> None:
        super().__init__(alpha, cmap, positive_only, size)
        self.tiled = bool(tiled)
        self.n_images = 1 if self.tiled else 2

    def __call__(self, image: np.ndarray, attribution: np.ndarray) -> list[Image.Image]:
        img, a = self._check(image, attribution)
        heat = self.heat(img, a)
        if not self.tiled:
            return [_to_pil(img, self.size), _to_pil(heat, self.size)]
        gap = np.ones((img.shape[0], max(1, img.shape[1] // 16), 3))
        return [_to_pil(np.concatenate([img, gap, heat], 1), self.size)]


class Box(Renderer):
    """A rectangle around the most relevant region: the connected part of the top ``share`` of
    pixels that holds the most attribution (8-connectivity), drawn ``width`` pixels wide (at the
    output size) in ``color``."""

    def __init__(self, share: float = 0.1, color: tuple[float, float, float] | list[float] = (1.0, 0.0, 0.0),
                 width: int = 3, size: int | None = 336) -> None:
        super().__init__(size)
        self.share = _check_share(share, "render.share")
        self.color = tuple(int(round(255 * c)) for c in color)
        self.width = int(width)

    def box(self, attribution: np.ndarray) -> tuple[int, int, int, int]:
        """``(top, left, bottom, right)`` (inclusive) of the most relevant region, in map pixels."""
        from scipy import ndimage

        a = np.nan_to_num(np.asarray(attribution, dtype=np.float64))
        labels, n = ndimage.label(top_share_mask(a, self.share), structure=np.ones((3, 3)))
        best = 1 + int(np.argmax(ndimage.sum(a, labels, index=np.arange(1, n + 1)))) if n else 0
        rows, cols = np.nonzero(labels == best) if n else np.nonzero(np.ones_like(a, bool))
        return int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())

    def __call__(self, image: np.ndarray, attribution: np.ndarray) -> list[Image.Image]:
        img, a = self._check(image, attribution)
        top, left, bottom, right = self.box(a)
        out = _to_pil(img, self.size)
        sy, sx = out.height / img.shape[0], out.width / img.shape[1]
        ImageDraw.Draw(out).rectangle([left * sx, top * sy, (right + 1) * sx - 1, (bottom + 1) * sy - 1],
                                      outline=self.color, width=self.width)
        return [out]


class Concepts(Renderer):
    """The image beside its top concepts (``xai=crp``), one row each: the concept's conditional
    heatmap over the image, then its reference patches (where the model used the same concept in
    other images), numbered as the prompt counts them.

    Args:
        n_patches: reference patches per concept.
        patch: side of each patch in the picture.
    """

    needs_concepts: ClassVar[bool] = True
    kind: ClassVar[str] = "concepts"

    def __init__(self, n_patches: int = 4, patch: int = 72, size: int | None = 336) -> None:
        super().__init__(size)
        self.n_patches, self.patch = int(n_patches), int(patch)

    def __call__(self, image: np.ndarray, attribution: np.ndarray, concepts: list | None = None) -> list[Image.Image]:
        if not concepts:
            raise HarnessError("render=concepts shows an image's concepts: use it with xai=crp")
        img, _ = self._check(image, attribution)
        p, gap = self.patch, max(2, self.patch // 12)
        rows = len(concepts) + 1
        cols = self.n_patches + 1
        canvas = Image.new("RGB", (cols * (p + gap) + 28, rows * (p + gap)), "white")
        draw = ImageDraw.Draw(canvas)
        base = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(base).resize((p, p), Image.BICUBIC), (28, 0))
        for r, c in enumerate(concepts, start=1):
            pos = np.clip(np.nan_to_num(np.asarray(c.heatmap, dtype=np.float64)), 0, None)
            heat = (pos / pos.max() if pos.max() > 0 else pos)[..., None]  # each concept to its own peak
            red = np.zeros_like(img)
            red[..., 0] = 1.0
            mixed = img * (1 - 0.65 * heat) + red * 0.65 * heat
            y = r * (p + gap)
            draw.text((2, y + p // 2 - 6), str(r), fill="black")
            canvas.paste(_to_pil(mixed, None).resize((p, p), Image.BICUBIC), (28, y))
            for j, patch in enumerate(c.patches[: self.n_patches]):
                canvas.paste(Image.fromarray(patch).resize((p, p), Image.NEAREST), (28 + (j + 1) * (p + gap), y))
        if self.size is not None:
            w, h = canvas.size
            k = self.size / min(w, h)
            canvas = canvas.resize((round(w * k), round(h * k)), Image.BICUBIC) if k > 1 else canvas
        return [canvas]
