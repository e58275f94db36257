"""Heatmap overlays of attribution maps, for run artifacts and for people."""

from __future__ import annotations

import numpy as np
from PIL import Image


def normalise(attribution: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Signed map to [-1, 1], scaled by a high percentile of |a| so one outlier does not wash
    out the rest."""
    a = np.nan_to_num(np.asarray(attribution, dtype=np.float64))
    scale = np.percentile(np.abs(a), percentile)
    return np.clip(a / scale, -1, 1) if scale > 0 else np.zeros_like(a)


def overlay(
    image: np.ndarray,
    attribution: np.ndarray,
    alpha: float = 0.55,
    cmap: str = "bwr",
    min_side: int = 160,
    side_by_side: bool = True,
) -> Image.Image:
    """Draw ``attribution`` over ``image`` (float ``[3, H, W]`` or ``[H, W, 3]`` in [0, 1]).

    Positive relevance is red, negative blue (``bwr``); small images are enlarged with nearest
    neighbour so patches stay visible. With ``side_by_side`` the original is shown on the left.
    """
    from matplotlib import colormaps

    img = np.asarray(image, dtype=np.float32)
    if img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.transpose(1, 2, 0)
    heat = colormaps[cmap]((normalise(attribution) + 1) / 2)[..., :3]
    weight = alpha * np.abs(normalise(attribution))[..., None]
    mixed = img * (1 - weight) + heat * weight
    panels = [img, mixed] if side_by_side else [mixed]
    gap = np.ones((img.shape[0], max(1, img.shape[1] // 16), 3), dtype=np.float32)
    canvas = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    out = Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8))
    k = max(1, -(-min_side // img.shape[0]))
    return out.resize((out.width * k, out.height * k), Image.NEAREST) if k > 1 else out
