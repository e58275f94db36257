"""Plain data passed between pipeline stages, and the project's error type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class HarnessError(Exception):
    """An error the user can fix (bad config value, missing file or weights).

    The entry point prints its message without a traceback.
    """


TARGETS = ("label", "predicted")  # the class a job explains and scores: the true one or the predicted one


def exit_cleanly(prog: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` for a command-line entry point: a :class:`HarnessError` becomes
    ``<prog>: error: <message>`` on stderr and exit status 1, without a traceback."""
    import sys

    try:
        return fn(*args)
    except HarnessError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)


@dataclass
class ImageSet:
    """Images with labels, as loaded from a dataset, before any model preprocessing.

    ``images`` are uint8 arrays ``[H, W, 3]`` (RGB, sizes may differ); ``masks`` hold a boolean
    ``[H, W]`` ground-truth object mask per image, or ``None`` where none is known; ``skipped``
    lists ``(id, reason)`` for inputs that could not be read; ``regions`` holds further named
    boolean masks, one per image, where the data knows them (``shapes``: ``mark``, the spurious
    corner mark, empty on images without it).
    """

    images: list[np.ndarray]
    labels: np.ndarray
    ids: list[str]
    class_names: list[str]
    masks: list[np.ndarray | None] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    regions: dict[str, list[np.ndarray]] = field(default_factory=dict)  # more named masks (shapes: the mark)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not (len(self.images) == len(self.labels) == len(self.ids)):
            raise ValueError("images, labels and ids must have the same length")
        if self.masks is not None and len(self.masks) != len(self.images):
            raise ValueError("masks must have one entry per image")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_masks(self) -> bool:
        return self.masks is not None and any(m is not None for m in self.masks)


@dataclass
class MetricOutput:
    """What an evaluation metric returns for a batch of images.

    ``scores`` maps score names to per-image arrays ``[N]`` (NaN where undefined); ``curves``
    maps curve names to per-image arrays ``[N, K]`` sampled at ``curve_x`` (``[K]``), and
    ``curve_y`` says what the curves measure (an axis label).
    ``higher_is_better`` names the scores whose direction differs from the metric class's
    ``higher_is_better``; ``errors`` lists ``(image index, reason)`` for images scored NaN
    because the metric failed on them.
    """

    scores: dict[str, np.ndarray]
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    curve_x: np.ndarray | None = None
    curve_y: str = ""
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    errors: list[tuple[int, str]] = field(default_factory=list)
