"""Synthetic shapes: a seeded dataset with a ground-truth object mask for every image.

Each image shows one shape (the class) of random colour, position, scale and rotation on a noisy
or textured background. The mask marks exactly the shape's pixels, so localisation metrics have an
answer key. Optionally a spurious cue, a small square whose colour depends on the class, is drawn
in a fixed corner of a share of the images, for shortcut-learning experiments; it is never part of
the mask.

For reveal-and-revise studies (Pahde et al., "Reveal to Revise", MICCAI 2023) three artifacts can be
planted on a share of one class's images, each with a known location (``ImageSet.regions``):

- ``corner``: a 3x3 yellow square in the top-left corner (a fixed place, like a source tag);
- ``bandaid``: a beige 3x8 strip with a darker pad, horizontal or vertical, at a random place (the
  band-aids of dermoscopy images);
- ``watermark``: the letters "AI" in white, 7x5 pixels, at a random place (a text watermark).

Each artifact draws its coin and its placement from a random stream of its own, one draw per image
whatever its probability, so switching an artifact on or off (or poisoning a test set with it)
changes the artifact's pixels and nothing else: the same arguments otherwise give the same shapes.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

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


ARTIFACTS = ("corner", "bandaid", "watermark")
#: Every artifact off, each with the class it goes with when switched on (``p > 0``).
DEFAULT_ARTIFACTS = MappingProxyType({"corner": {"p": 0.0, "classes": ["circle"]},
                                      "bandaid": {"p": 0.0, "classes": ["square"]},
                                      "watermark": {"p": 0.0, "classes": ["triangle"]}})
_CORNER_COLOUR = np.array([1.0, 1.0, 0.0], dtype=np.float32)
_BANDAID_COLOUR = np.array([0.95, 0.78, 0.62], dtype=np.float32)
_PAD_COLOUR = np.array([0.78, 0.58, 0.45], dtype=np.float32)
_GLYPHS = {"A": (".#.", "#.#", "###", "#.#", "#.#"), "I": ("###", ".#.", ".#.", ".#.", "###")}
_TEXT = np.concatenate([np.array([[c == "#" for c in row] for row in _GLYPHS["A"]]), np.zeros((5, 1), bool),
                        np.array([[c == "#" for c in row] for row in _GLYPHS["I"]])], axis=1)  # "AI", 5 x 7


def _artifact_pixels(name: str, size: int, draw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where artifact ``name`` goes on a ``size`` image and each pixel's colour ``[size, size, 3]``,
    from ``draw``, four uniform numbers of the artifact's own stream (placement and orientation)."""
    mask, colour = np.zeros((size, size), bool), np.zeros((size, size, 3), np.float32)
    if name == "corner":
        mask[:3, :3] = True
        colour[mask] = _CORNER_COLOUR
    elif name == "bandaid":
        h, w = (3, 8) if draw[2] < 0.5 else (8, 3)
        top, left = int(draw[0] * (size - h + 1)), int(draw[1] * (size - w + 1))
        mask[top:top + h, left:left + w] = True
        colour[mask] = _BANDAID_COLOUR
        pad = np.zeros_like(mask)
        if h == 3:
            pad[top:top + 3, left + 3:left + 5] = True
        else:
            pad[top + 3:top + 5, left:left + 3] = True
        colour[pad] = _PAD_COLOUR
    elif name == "watermark":
        h, w = _TEXT.shape
        top, left = int(draw[0] * (size - h + 1)), int(draw[1] * (size - w + 1))
        mask[top:top + h, left:left + w] = _TEXT
        colour[mask] = 1.0
    return mask, colour


def check_artifacts(artifacts: Mapping[str, Any] | None, poison: Any, classes: list[str]) -> tuple[dict, list[str]]:
    """``artifacts`` as ``{name: (p, class indices or None for every class)}`` for the artifacts
    that are on (``p > 0``), and ``poison`` as a list of names; a :class:`HarnessError` naming
    the valid options for anything else."""
    valid = ", ".join(ARTIFACTS)
    out = {}
    for name, spec in dict(artifacts or {}).items():
        if name not in ARTIFACTS:
            raise HarnessError(f"dataset.artifacts has no artifact {name!r}; valid: {valid}")
        spec = dict(spec or {})
        if bad := sorted(set(spec) - {"p", "classes"}):
            raise HarnessError(f"dataset.artifacts.{name} has unknown keys {bad}; valid: p, classes")
        p = float(spec.get("p", 0.0))
        if not 0 <= p <= 1:
            raise HarnessError(f"dataset.artifacts.{name}.p={p} must lie in [0, 1]")
        on = spec.get("classes")
        if on is not None:
            on = [on] if isinstance(on, str | int) else list(on)
            if missing := [c for c in on if c not in classes]:
                raise HarnessError(f"dataset.artifacts.{name}.classes names {missing}, not classes of this "
                                   f"dataset; valid: {', '.join(classes)} (or null: every class)")
            on = sorted(classes.index(c) for c in on)
        if p > 0:
            out[name] = (p, on)
    poison = [] if poison is None else [poison] if isinstance(poison, str) else list(poison)
    if bad := [n for n in poison if n not in ARTIFACTS]:
        raise HarnessError(f"dataset.poison names unknown artifacts {bad}; valid: {valid}")
    return out, poison


def active_artifacts(train_data: dict) -> dict:
    """``train_data`` (arguments of :func:`make_shapes`) without artifact settings that draw no
    artifact (``p: 0``, empty ``poison``): they change no pixel, so caches keyed on the
    arguments stay valid when the keys appear."""
    out = dict(train_data)
    arts = {k: v for k, v in dict(out.pop("artifacts", None) or {}).items() if float(dict(v or {}).get("p", 0)) > 0}
    poison = out.pop("poison", None)
    if arts:
        out["artifacts"] = arts
    if poison:
        out["poison"] = poison
    return out


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
    artifacts: Mapping[str, Any] | None = DEFAULT_ARTIFACTS,
    poison: list[str] | str | None = None,
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
        artifacts: planted artifacts, ``{name: {p: share, classes: [class names] | None}}``:
            artifact ``name`` (one of ``ARTIFACTS``) is drawn on each image of ``classes``
            (``None``: every class) with probability ``p``; see the module docstring.
        poison: artifacts drawn on every image of every class, whatever ``artifacts`` says (a
            poisoned test set: the same images as without, plus the artifact).
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
    planted, poison = check_artifacts(artifacts, poison, classes)
    drawn = [a for a in ARTIFACTS if a in planted or a in poison]  # a fixed order: later ones on top
    streams = {a: np.random.default_rng([seed, zlib.crc32(split.encode()), zlib.crc32(a.encode())]) for a in drawn}
    found: dict[str, list[np.ndarray]] = {a: [] for a in drawn}
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
        for a in drawn:
            draw = streams[a].uniform(size=4)  # coin, then placement: one draw per image, on or off
            p, on = planted.get(a, (0.0, None))
            if a in poison or (draw[3] < p and (on is None or label in on)):
                where, colour = _artifact_pixels(a, image_size, draw)
                img[where] = colour[where]
                mask = mask & ~where  # the object mask holds the shape's visible pixels only
                for b in drawn[:drawn.index(a)]:  # and an artifact's region its visible pixels
                    found[b][-1] = found[b][-1] & ~where
                found[a].append(where)
            else:
                found[a].append(np.zeros((image_size, image_size), bool))
        images.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
        masks.append(mask)
        labels.append(label)
    ids = [f"shapes-{split}-{seed}-{i:05d}" for i in range(n)]
    return ImageSet(images=images, labels=np.array(labels), ids=ids, class_names=classes, masks=masks,
                    regions=({"mark": marks} if spurious_prob > 0 else {}) | found)
