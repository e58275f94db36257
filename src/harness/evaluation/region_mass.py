"""Share of the attribution on a fixed box: where a known artifact (a watermark, a tag, a
spurious mark) sits in every image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
from torch import nn

from harness.evaluation.base import Metric
from harness.types import HarnessError, MetricOutput


def check_box(box: Sequence[int], what: str = "box") -> tuple[int, int, int, int]:
    """``[top, left, bottom, right]`` as four ints with ``0 <= top < bottom`` and
    ``0 <= left < right``; a :class:`HarnessError` naming ``what`` otherwise."""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise HarnessError(f"{what}={box!r} must be [top, left, bottom, right] in input pixels") from None
    if len(values) != 4 or any(v != int(v) for v in values):
        raise HarnessError(f"{what}={list(box)!r} must be four whole numbers [top, left, bottom, right] "
                           "in input pixels (bottom and right exclusive)")
    top, left, bottom, right = (int(v) for v in values)
    if top < 0 or left < 0 or bottom <= top or right <= left:
        raise HarnessError(f"{what}={[top, left, bottom, right]} is empty or negative: need "
                           "0 <= top < bottom and 0 <= left < right (bottom and right exclusive)")
    return top, left, bottom, right


def box_inside(box: tuple[int, int, int, int], height: int, width: int, what: str = "box") -> None:
    """A :class:`HarnessError` when ``box`` reaches outside an ``height x width`` image."""
    top, left, bottom, right = box
    if bottom > height or right > width:
        raise HarnessError(f"{what}={list(box)} reaches outside the {height}x{width} input (bottom <= {height}, "
                           f"right <= {width}); the box is in the pixels of the model's input, after its "
                           "preprocessing (resize, crop)")


class RegionMass(Metric):
    """How much of the attribution lies on a fixed box of the input.

    For each image, ``region_mass`` is the share of the map's positive attribution inside the
    box, ``sum(a+ on box) / sum(a+)`` with ``a+ = max(a, 0)`` (NaN for a map without positive
    mass or with non-finite values), and ``region_mass_ratio`` is that share divided by the
    box's share of the image area: 1 when the box gets no more than a uniform map would give
    it, ``H*W / box area`` when everything is on the box.

    The use case is a known artifact location: a watermark, a source tag or a spurious mark
    that sits in the same place in every image, where the question is whether a classifier
    (a "Clever Hans" predictor) looks at it (Lapuschkin et al. 2019 found a PASCAL VOC
    classifier deciding "horse" from a copyright tag in the image corner). It needs no object
    mask, so it scores any dataset.

    Direction: a readout, not a quality score. Higher means more relevance on the box; whether
    that is good depends on the box and on the model: a faithful explanation of a model that
    uses the artifact *should* put mass there, one of a model that ignores it should not. The
    metric records ``higher_is_better = True`` in that sense ("more on the box"), so reports
    rank by mass on the box; read it next to accuracy with and without the artifact, not as a
    grade of the explanation.

    References:
        Lapuschkin et al., "Unmasking Clever Hans predictors and assessing what machines really
        learn", Nature Communications 10, 1096 (2019).

    Args:
        box: ``[top, left, bottom, right]`` in the pixels of the model's input (the attribution
            map's), bottom and right exclusive; a box reaching outside the input is an error.
        name: prefix of the logged scores (``<name>``, ``<name>_ratio``), so several boxes can
            be scored in one run.
        region: instead of the box, the dataset's named region of each image (``ImageSet.regions``;
            ``shapes``: ``mark``, ``corner``, ``bandaid``, ``watermark``, wherever the artifact was
            drawn), or ``any`` for all its regions together. An image without the region scores
            NaN (with ``any``, every image of data without regions); a named region the data lacks
            is an error naming the regions it has.
    """

    family: ClassVar[str] = "localisation"

    def __init__(self, box: Sequence[int] = (0, 0, 3, 3), name: str = "region_mass", region: str | None = None) -> None:
        super().__init__(name)
        self.box = check_box(box, "metrics.region_mass.box")
        self.region = None if region is None else str(region)
        self.needs_regions = self.region is not None

    def _masks(self, regions: dict[str, np.ndarray] | None, shape: tuple[int, int, int]) -> np.ndarray:
        """``[N, H, W]``: where to measure, the box on every image or each image's region."""
        if self.region is None:
            top, left, bottom, right = self.box
            box_inside(self.box, shape[1], shape[2], "metrics.region_mass.box")
            m = np.zeros(shape, bool)
            m[:, top:bottom, left:right] = True
            return m
        regions = regions or {}
        if self.region == "any":  # data without regions (a clean test set): nothing to measure, NaN
            return np.logical_or.reduce([np.asarray(v, bool) for v in regions.values()]) if regions else \
                np.zeros(shape, bool)
        if self.region not in regions:
            raise HarnessError(f"metrics {self.name}: region={self.region!r} is not a region of this dataset (its "
                               f"regions: {', '.join(regions) or 'none'}; or any)")
        m = np.asarray(regions[self.region], bool)
        if m.shape != shape:
            raise HarnessError(f"metrics {self.name}: region masks {m.shape} do not match the maps {shape}")
        return m

    def __call__(
        self,
        model: nn.Module | None,
        x,
        attributions: np.ndarray,
        targets,
        masks: np.ndarray | None = None,
        regions: dict[str, np.ndarray] | None = None,
    ) -> MetricOutput:
        a = np.asarray(attributions, dtype=np.float64)
        if a.ndim != 3:
            raise ValueError(f"attributions must be [N, H, W], got shape {a.shape}")
        n = a.shape[0]
        where = self._masks(regions, a.shape)
        area_share = where.mean((1, 2))
        pos = np.clip(a, 0, None)
        total = pos.sum((1, 2))
        on_box = (pos * where).sum((1, 2))
        ok = np.isfinite(a).all((1, 2)) & (total > 0) & (area_share > 0)
        share = np.full(n, np.nan)
        share[ok] = on_box[ok] / total[ok]
        ratio = np.full(n, np.nan)
        ratio[ok] = share[ok] / area_share[ok]
        return MetricOutput(scores={self.name: share, f"{self.name}_ratio": ratio})
