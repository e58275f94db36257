"""What every MLLM backend takes and gives: requests, decoding settings, answers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from harness.types import HarnessError


@dataclass
class Concept:
    """One concept of an image (``xai=crp``): its channel, share of the layer's relevance,
    conditional heatmap ``[H, W]``, reference patches (uint8 ``[h, w, 3]``) with their boxes
    ``(top, left, bottom, right)`` in their own images, and the size of those images."""

    channel: int
    share: float
    heatmap: np.ndarray
    patches: list[np.ndarray]
    boxes: list[tuple[int, int, int, int]]
    reference_size: tuple[int, int]


@dataclass
class Request:
    """One question about one image: what the MLLM is shown and asked, plus what a non-LLM
    baseline reads instead (the attribution map, the predicted label, the object mask, the
    concepts)."""

    images: list[Image.Image]
    prompt: str
    system: str | None = None
    attribution: np.ndarray | None = None
    label: str = ""
    score: float | None = None
    mask: np.ndarray | None = None
    concepts: list[Concept] | None = None


@dataclass
class Answer:
    """One generated answer, with what it cost."""

    text: str
    latency_s: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


@dataclass
class Decoding:
    """Decoding settings, logged in full with every answer.

    Greedy by default (``do_sample: false``). ``min_new_tokens`` (transformers only) forbids
    the end of text before that many tokens. ``num_samples`` > 1 draws that many answers per
    request (sampling must then be on, else the answers would be identical), for consistency
    scoring.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise HarnessError("mllm.decoding: num_samples and max_new_tokens must be >= 1")
        if self.num_samples > 1 and not self.do_sample:
            raise HarnessError("mllm.decoding.num_samples > 1 needs do_sample: true (greedy answers are identical)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class MLLM:
    """Base of the backends: ``generate(requests) -> answers`` (``decoding.num_samples`` per
    request), and ``identity()``: everything that decides the answers, for the cache key and
    the records (never a secret)."""

    backend: str = "base"

    def __init__(self, model: str, decoding: dict[str, Any] | Decoding | None = None) -> None:
        self.model = str(model)
        self.decoding = decoding if isinstance(decoding, Decoding) else Decoding(**dict(decoding or {}))

    def identity(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model, "decoding": self.decoding.as_dict()}

    def generate(self, requests: list[Request]) -> list[list[Answer]]:
        raise NotImplementedError


@dataclass
class Record:
    """An answer as stored: the MLLM's text with everything needed to reproduce and audit it."""

    image_id: str
    sample: int
    text: str
    prompt: str
    system: str | None
    backend: str
    model: str
    decoding: dict[str, Any]
    latency_s: float
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    rendered: list[str] = field(default_factory=list)
    cache_key: str = ""
    cached: bool = False
    parsed: dict[str, Any] | None = None
