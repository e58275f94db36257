"""Pointing game against ground-truth object masks."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from scipy import ndimage
from torch import nn

from harness.evaluation.base import Metric
from harness.types import MetricOutput


class PointingGame(Metric):
    """Does the attribution's maximum fall on the object?

    A hit scores 1, a miss 0. Where several pixels share the maximum, the score is the share of
    them that lie on the object (so a constant map scores the object's share of the image
    instead of whatever pixel comes first). Images without a mask, or with an empty one, score
    NaN. ``tolerance`` grows the mask by that many pixels, as in the original protocol.

    References:
        Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016 / IJCV 2018.

    Args:
        tolerance: pixels by which the mask is dilated before testing (the paper uses 15 at
            224 px, about 2 at 32 px; 0: the maximum must lie on the mask itself).
        name: the logged score's name.
    """

    family: ClassVar[str] = "localisation"
    needs_masks: ClassVar[bool] = True

    def __init__(self, tolerance: int = 1, name: str = "pointing_game") -> None:
        super().__init__(name)
        self.tolerance = int(tolerance)

    def __call__(
        self,
        model: nn.Module,
        x,
        attributions: np.ndarray,
        targets,
        masks: np.ndarray | None = None,
    ) -> MetricOutput:
        a = np.asarray(attributions, dtype=np.float64)
        scores = np.full(len(a), np.nan)
        if masks is not None:
            disk = None
            if self.tolerance > 0:
                r = self.tolerance
                yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
                disk = xx**2 + yy**2 <= r**2
            for i, (ai, mi) in enumerate(zip(a, masks)):
                if mi is None or not mi.any() or not np.isfinite(ai).all():
                    continue
                m = ndimage.binary_dilation(mi, structure=disk) if disk is not None else mi
                top = ai == ai.max()
                scores[i] = m[top].mean()
        return MetricOutput(scores={self.name: scores})
