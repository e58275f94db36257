"""What a text metric sees: the answers of a run and, per image, what the answer is about."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from harness.mllm.base import Record

WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


@dataclass
class Context:
    """What an answer is about: the predicted label, the dataset's classes, the map, the mask,
    and the image (what a judge may look at)."""

    label: str
    class_names: list[str]
    attribution: np.ndarray
    mask: np.ndarray | None = None
    image: Any = None


class TextMetric:
    """Base: ``metric(records, contexts) -> {score: [one value per record]}``.

    ``family`` and ``directions`` (score -> higher is better) are recorded for reports.
    """

    family: ClassVar[str] = "text"
    directions: ClassVar[dict[str, bool]] = {}

    def __call__(self, records: list[Record], contexts: dict[str, Context]) -> dict[str, np.ndarray]:
        raise NotImplementedError
