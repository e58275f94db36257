"""Superpixel segmentations shared by the perturbation methods (LIME, KernelSHAP)."""

from __future__ import annotations

import numpy as np

from harness.types import HarnessError

METHODS = ("slic", "quickshift", "grid")


def segment(image: np.ndarray, method: str = "slic", n_segments: int = 50, compactness: float = 10.0,
            kernel_size: float = 4.0, max_dist: float = 200.0, ratio: float = 0.2, patch: int = 4,
            seed: int = 0) -> np.ndarray:
    """Label every pixel of an ``[H, W, 3]`` image in [0, 1] with its superpixel ``0..K-1``.

    Args:
        method: ``slic`` (Achanta et al. 2012), ``quickshift`` (Vedaldi & Soatto 2008, the
            ``lime_image`` default) or ``grid`` (square ``patch`` × ``patch`` cells, e.g. ViT patches).
        n_segments, compactness: SLIC settings.
        kernel_size, max_dist, ratio: quickshift settings (lime's defaults).
        patch: cell side for ``grid``.
        seed: quickshift's random seed.
    """
    h, w = image.shape[:2]
    if method == "grid":
        cols = -(-w // patch)
        seg = (np.arange(h)[:, None] // patch) * cols + np.arange(w)[None, :] // patch
    elif method == "slic":
        from skimage.segmentation import slic

        seg = slic(image, n_segments=n_segments, compactness=compactness, start_label=0,
                   channel_axis=-1)
    elif method == "quickshift":
        from skimage.segmentation import quickshift

        seg = quickshift(image.astype(np.float64), kernel_size=kernel_size, max_dist=max_dist,
                         ratio=ratio, rng=seed)
    else:
        raise HarnessError(f"xai.segmentation={method!r} is not valid; valid: {', '.join(METHODS)}")
    _, contiguous = np.unique(seg, return_inverse=True)  # labels 0..K-1 with no gaps
    return contiguous.reshape(h, w)


def top_k_mask(attribution: np.ndarray, segments: np.ndarray, k: int, positive_only: bool = True) -> np.ndarray:
    """Boolean mask of the ``k`` superpixels with the highest mean attribution (the regions
    LIME's paper figure marks); with ``positive_only`` only superpixels with positive weight."""
    ids = np.unique(segments)
    means = np.array([attribution[segments == i].mean() for i in ids])
    order = ids[np.argsort(-means, kind="stable")][:k]
    if positive_only:
        order = [i for i in order if means[np.searchsorted(ids, i)] > 0]
    return np.isin(segments, order)
