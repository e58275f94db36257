"""Figures of concepts: the atlas (reference patches per concept) and one image's top concepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from harness.render.overlay import normalise
from harness.xai.concepts import Atlas, crop


def _patch(image: np.ndarray, box: np.ndarray, side: int = 48) -> np.ndarray:
    """The box of ``image`` (uint8 ``[H, W, 3]``) enlarged to ``side`` px (nearest neighbour)."""
    from PIL import Image

    part = crop(image, box)
    if part.size == 0:
        part = image
    return np.asarray(Image.fromarray(part).resize((side, side), Image.NEAREST))


def atlas_figure(atlas: Atlas, images: list[np.ndarray], path: str | Path, concepts: Any = None, n_concepts: int = 6,
                 n_refs: int = 6, title: str = "") -> Path:
    """Rows of concepts (the most relevant on the reference set, or ``concepts``), each with its
    reference patches by relevance and, to the right, by activation."""
    from matplotlib.figure import Figure

    from harness.report.figures import FULL_WIDTH

    ids = list(atlas.top_concepts(n_concepts) if concepts is None else concepts)
    n = min(n_refs, atlas.by_relevance.shape[1])
    cell = min(1.1, FULL_WIDTH / (2 * n + 1))  # a paper's full width, where its 7-pt labels stay 7 pt
    fig = Figure(figsize=(cell * (2 * n + 1), 1.05 * cell * len(ids) + 0.6))
    axes = fig.subplots(len(ids), 2 * n + 1, squeeze=False)
    for row, c in enumerate(ids):
        for col in range(2 * n + 1):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col == n:
                ax.axis("off")
                continue
            by_rel = col < n
            j = col if by_rel else col - n - 1
            idx = int((atlas.by_relevance if by_rel else atlas.by_activation)[c, j])
            if idx < 0:
                ax.axis("off")
                continue
            box = (atlas.relevance_boxes if by_rel else atlas.activation_boxes)[c, j]
            ax.imshow(_patch(images[idx], box))
        axes[row, 0].set_ylabel(f"concept {c}\nR̄={atlas.mean_relevance[c]:.3g}", fontsize=7)
    axes[0, 0].set_title("by relevance", fontsize=8, loc="left")
    axes[0, n + 1].set_title("by activation", fontsize=8, loc="left")
    fig.suptitle(title or f"concept atlas of {atlas.layer}", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=220)
    return out


def concept_figure(image: np.ndarray, maps: np.ndarray, ids: np.ndarray, shares: np.ndarray, atlas: Atlas,
                   ref_images: list[np.ndarray], path: str | Path, n_refs: int = 4, title: str = "") -> Path:
    """One image (uint8 ``[H, W, 3]``) with each top concept's conditional heatmap, its relevance
    share and a strip of its reference patches: what ``render=concepts`` shows and the report
    draws."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    k = len(ids)
    n = min(n_refs, atlas.by_relevance.shape[1])
    fig = Figure(figsize=(1.2 * (n + 1) + 0.4, 1.25 * (k + 1)))
    axes = fig.subplots(k + 1, n + 1, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    axes[0, 0].imshow(image)
    axes[0, 0].axis("on")
    fig.suptitle(f"{title}\nconcepts: conditional heatmap (share of relevance), reference patches", fontsize=7)
    img = image.astype(np.float32) / 255
    for row, (c, share, m) in enumerate(zip(ids, shares, maps), start=1):
        heat = normalise(m)
        rgb = colormaps["bwr"]((heat + 1) / 2)[..., :3]
        w = 0.6 * np.abs(heat)[..., None]
        axes[row, 0].imshow(img * (1 - w) + rgb * w)
        axes[row, 0].axis("on")
        axes[row, 0].set_ylabel(f"concept {int(c)}\n{100 * float(share):.0f} %", fontsize=7)
        for j in range(n):
            idx = int(atlas.by_relevance[int(c), j])
            if idx >= 0:
                axes[row, j + 1].imshow(_patch(ref_images[idx], atlas.relevance_boxes[int(c), j]))
                axes[row, j + 1].axis("on")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out


def prototype_figure(protos: Any, vectors: np.ndarray, labels: np.ndarray, images: list[np.ndarray], path: str | Path,
                     class_names: list[str] | None = None, n_images: int = 4, max_classes: int = 8) -> Path | None:
    """PCX prototypes: one row per class and prototype, the reference images nearest to it (by
    their concept-relevance vectors) and the prototype's three most relevant concepts."""
    from matplotlib.figure import Figure

    from harness.xai.concepts import _normalise

    v = _normalise(vectors)
    rows = [(k, j) for k in protos.classes[:max_classes] for j in range(len(protos.means[k]))]
    if not rows:
        return None
    fig = Figure(figsize=(1.1 * n_images + 1.6, 1.05 * len(rows) + 0.5))
    axes = fig.subplots(len(rows), n_images, squeeze=False)
    for r, (k, j) in enumerate(rows):
        members = np.flatnonzero(labels == k)
        d = np.linalg.norm(v[members] - protos.means[k][j], axis=1)
        nearest = members[np.argsort(d, kind="stable")[:n_images]]
        top = np.argsort(-protos.means[k][j])[:3]
        for c in range(n_images):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(nearest):
                ax.imshow(images[nearest[c]])
            else:
                ax.axis("off")
        name = class_names[k] if class_names and k < len(class_names) else str(k)
        axes[r, 0].set_ylabel(f"{name} #{j + 1}\nconcepts {', '.join(map(str, top))}", fontsize=6)
    fig.suptitle("PCX prototypes: nearest reference images, top concepts", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out
