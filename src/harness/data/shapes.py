"""Synthetic shapes: a seeded dataset with a ground-truth object mask for every image.

Each image shows one shape (the class) of random colour, position, scale and rotation on a noisy
or textured background. The mask marks exactly the shape's pixels, so localisation metrics have an
answer key. Optionally a spurious cue, a small square whose colour depends on the class, is drawn
in a fixed corner of a share of the images, for shortcut-learning experiments; it is never part of
the mask.
"""

from __future__ import annotations

import zlib

import numpy as np

from harness.types import HarnessError, ImageSet

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
BACKGROUNDS = ("noise", "texture", "mixed", "flat")
SPLITS = ("train", "val", "test")
# Bump when the same arguments start to give other pixels (trained-model caches key on it).
GENERATOR_VERSION = 2
# One colour per class for the spurious mark (RGB, 0..1), chosen to be mutually distinct.
_MARK_COLOURS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.float32
)


def shape_mask(kind: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean ``[size, size]`` mask of one shape centred at (cx, cy) with radius r, rotated."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # coordinates in the shape's frame
    if kind == "circle":
        return u**2 + v**2 <= r**2
    if kind == "ring":
        d2 = u**2 + v**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if kind == "diamond":  # a rhombus, so that no rotation of a square matches it
        return np.abs(u) / r + np.abs(v) / (0.6 * r) <= 1
    if kind == "cross":
        w = r / 3
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if kind == "triangle":
        # Equilateral triangle with circumradius r: three half-planes.
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + k * 2 * np.pi / 3
            inside &= (u * np.cos(a) + v * np.sin(a)) >= -r / 2
        return inside
    raise HarnessError(f"unknown shape {kind!r}; valid shapes: {', '.join(SHAPES)}")


def _background(rng: np.random.Generator, size: int, kind: str, noise: float) -> np.ndarray:
    base = rng.uniform(0.15, 0.85, size=3).astype(np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if kind == "mixed":
        kind = ("noise", "texture")[int(rng.integers(2))]
    if kind == "texture":
        # Smooth random field: coarse noise upsampled, plus oriented stripes.
        cells = int(rng.integers(3, 7))
        coarse = rng.normal(0, 1, size=(cells, cells, 3)).astype(np.float32)
        idx = np.minimum((np.arange(size) * cells) // size, cells - 1)
        img += 0.12 * coarse[idx][:, idx]
        theta, freq = rng.uniform(0, np.pi), rng.uniform(0.2, 0.6)
        yy, xx = np.mgrid[0:size, 0:size]
        img += 0.08 * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy))[..., None]
    if kind != "flat":
        img += rng.normal(0, noise, size=img.shape).astype(np.float32)
    return img


def _colour_far_from(rng: np.random.Generator, ref: np.ndarray, min_dist: float) -> np.ndarray:
    for _ in range(100):
        col = rng.uniform(0, 1, size=3).astype(np.float32)
        if np.abs(col - ref).mean() >= min_dist:
            return col
    return (1.0 - ref).astype(np.float32)


def make_shapes(
    n: int = 64,
    image_size: int = 32,
    classes: list[str] | tuple[str, ...] = ("circle", "square", "triangle", "cross"),
    seed: int = 0,
    split: str = "test",
    background: str = "mixed",
    noise: float = 0.03,
    scale: tuple[float, float] = (0.28, 0.42),
    min_contrast: float = 0.4,
    spurious_prob: float = 0.0,
    spurious_size: int = 3,
) -> ImageSet:
    """Generate ``n`` images; the same arguments always give the same pixels.

    Args:
        n: number of images.
        image_size: side of the square images in pixels.
        classes: shape names, one class each (subset of ``SHAPES``).
        seed: base seed; ``split`` selects an independent stream from it.
        split: ``train``, ``val`` or ``test``; the three never share an image stream.
        background: ``noise``, ``texture``, ``mixed`` (either, per image) or ``flat``.
        noise: standard deviation of the pixel noise on the background.
        scale: range of the shape radius as a fraction of the image size.
        min_contrast: minimum mean absolute colour difference between shape and background.
        spurious_prob: probability that an image carries the class-coloured corner mark.
        spurious_size: side of the mark in pixels.
    """
    classes = list(classes)
    bad = [c for c in classes if c not in SHAPES]
    if bad or not classes:
        raise HarnessError(f"dataset.classes has unknown shapes {bad}; valid: {', '.join(SHAPES)}")
    if split not in SPLITS:
        raise HarnessError(f"dataset.split={split!r} is not valid; valid: {', '.join(SPLITS)}")
    if background not in BACKGROUNDS:
        raise HarnessError(
            f"dataset.background={background!r} is not valid; valid: {', '.join(BACKGROUNDS)}"
        )
    if len(classes) > len(_MARK_COLOURS) and spurious_prob > 0:
        raise HarnessError("the spurious mark has colours for at most 6 classes")
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    images, masks, labels, marks = [], [], [], []
    for _ in range(n):
        label = int(rng.integers(len(classes)))
        img = _background(rng, image_size, background, noise)
        # 1.15 r is the farthest any shape reaches from its centre (a rotated square's corner):
        # keep every shape whole inside the image.
        r = min(rng.uniform(*scale) * image_size, image_size / 2 / 1.15)
        margin = 1.15 * r
        cx, cy = rng.uniform(margin, image_size - margin, size=2)
        mask = shape_mask(classes[label], image_size, cx, cy, r, rng.uniform(0, 2 * np.pi))
        img[mask] = _colour_far_from(rng, img[~mask].mean(0), min_contrast)
        mark = np.zeros((image_size, image_size), dtype=bool)
        if spurious_prob > 0 and rng.uniform() < spurious_prob:
            img[:spurious_size, :spurious_size] = _MARK_COLOURS[label]
            mark[:spurious_size, :spurious_size] = True
        marks.append(mark)
        images.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
        masks.append(mask)
        labels.append(label)
    ids = [f"shapes-{split}-{seed}-{i:05d}" for i in range(n)]
    return ImageSet(images=images, labels=np.array(labels), ids=ids, class_names=classes, masks=masks,
                    regions={"mark": marks} if spurious_prob > 0 else {})
