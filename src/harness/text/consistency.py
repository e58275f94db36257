"""Do the answers for the same input agree? Embedding cosine similarity, with a named lexical
fallback."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from harness.mllm.base import Record
from harness.text.base import Context, TextMetric

log = logging.getLogger(__name__)


# Loads that failed in this process, keyed by everything on this machine that decides whether a load can
# succeed (see :meth:`Embedder._load_key`): without network and without HF_HUB_OFFLINE each attempt spends
# about a minute on the hub client's retries, and a sweep's jobs share the process with the basic launcher.
# Under the same key a second attempt meets the same files and settings, so skipping it gives the job the
# result it would get anyway (the fallback, or the same error); a new folder, a fresh download into the hub
# cache, another device or HF_HUB_OFFLINE value is a new key and is tried. Loaded models are not kept here:
# each Embedder (one per metric, so per job) loads its own.
_UNAVAILABLE: dict[tuple, str] = {}


def _fingerprint(path: Path) -> tuple:
    """The modification times of the folder ``path`` and of its entries; () where there is no such folder."""
    try:
        return (path.stat().st_mtime_ns, tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(path))))
    except OSError:  # missing, not a folder, or unreadable
        return ()


class Embedder:
    """Texts to unit vectors: a sentence-transformers model, or TF-IDF when it is not available.

    ``name`` says which one was used (``embedding`` or ``tfidf``), so scores of the two are
    logged under different names and never mixed. The model loads from a local folder or the
    Hugging Face cache; offline (``HF_HUB_OFFLINE=1``) an uncached hub name falls back to
    TF-IDF with a warning, unless ``fallback`` is null (then it is an error).

    Args:
        model: sentence-transformers model (hub id or local folder).
        fallback: ``tfidf`` or null.
        device: torch device for the model.
    """

    def __init__(self, model: str = "sentence-transformers/all-MiniLM-L6-v2", fallback: str | None = "tfidf",
                 device: str = "cpu") -> None:
        from harness.types import HarnessError

        if fallback not in (None, "tfidf"):
            raise HarnessError(f"text_metrics fallback={fallback!r} is not valid; valid: tfidf, null")
        self.model_name, self.fallback, self.device = str(model), fallback, str(device)
        self._model: Any = None
        self.name = "embedding"

    def _load_key(self, offline: bool) -> tuple:
        """What decides whether loading ``model`` can succeed here: its name, the device, the
        offline switch, and the state of the local folder and of the hub cache's folder for it."""
        try:
            from huggingface_hub import constants

            hub = str(constants.HF_HUB_CACHE)
        except ImportError:  # no hub client (then no sentence-transformers either)
            hub = ""
        cached = _fingerprint(Path(hub) / f"models--{self.model_name.replace('/', '--')}") if hub else ()
        return (self.model_name, self.device, offline, hub, _fingerprint(Path(self.model_name).expanduser()), cached)

    def _load(self) -> Any:
        if self._model is None and self.name == "embedding":
            from harness.types import HarnessError

            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
            key = self._load_key(offline)
            try:
                from sentence_transformers import SentenceTransformer

                if key in _UNAVAILABLE:  # failed before in this process, nothing changed: no second minute of retries
                    raise OSError(_UNAVAILABLE[key])
                self._model = SentenceTransformer(self.model_name, device=self.device, local_files_only=offline)
            except Exception as e:  # noqa: BLE001 - OSError offline, or a broken folder
                _UNAVAILABLE.setdefault(key, f"{type(e).__name__}: {e}")
                if self.fallback is None:
                    raise HarnessError(f"sentence-transformers model {self.model_name!r} is not available "
                                       f"({type(e).__name__}); give a local folder or set fallback: tfidf") from None
                log.warning("sentence-transformers model %s is not available (%s): using the TF-IDF fallback, "
                            "logged as *_tfidf", self.model_name, type(e).__name__)
                self.name = "tfidf"
        return self._model

    def __call__(self, texts: list[str]) -> np.ndarray:
        """``[len(texts), D]`` unit vectors (all-zero rows for empty texts)."""
        model = self._load()
        if self.name == "embedding":
            v = np.asarray(model.encode(list(texts), convert_to_numpy=True, show_progress_bar=False), dtype=np.float64)
        else:
            from sklearn.feature_extraction.text import TfidfVectorizer

            if not any(t.strip() for t in texts):
                return np.zeros((len(texts), 1))
            v = TfidfVectorizer().fit_transform(texts).toarray()
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


class Consistency(TextMetric):
    """Agreement between the answers drawn for the same image (``mllm.decoding.num_samples``
    > 1): the mean pairwise cosine similarity of their embeddings, logged as
    ``consistency_embedding`` (or ``consistency_tfidf`` with the fallback) on each image's first
    answer (NaN on the others, and where an image has one answer). 1 for identical answers.
    Agreement across prompts and MLLMs is measured over a sweep by ``python -m
    harness.sensitivity``.
    """

    family: ClassVar[str] = "consistency"

    def __init__(self, model: str = "sentence-transformers/all-MiniLM-L6-v2", fallback: str | None = "tfidf",
                 device: str = "cpu") -> None:
        self.embedder = Embedder(model, fallback, device)

    @property
    def directions(self) -> dict[str, bool]:  # type: ignore[override]
        return {f"consistency_{self.embedder.name}": True}

    def __call__(self, records: list[Record], contexts: dict[str, Context]) -> dict[str, np.ndarray]:
        vecs = self.embedder([r.text for r in records])
        out = np.full(len(records), np.nan)
        by_image: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            by_image[r.image_id].append(i)
        for idx in by_image.values():
            if len(idx) > 1:
                sim = vecs[idx] @ vecs[idx].T
                out[idx[0]] = float(sim[np.triu_indices(len(idx), 1)].mean())
        return {f"consistency_{self.embedder.name}": out}
