"""Stage outputs cached by content, so a sweep computes each prediction and attribution once.

Predictions are keyed by (data, model), attributions by (data, model, xai, targets, device):
each key is a SHA-256 over exactly the inputs that decide the output, namely the images' bytes,
labels and ids, the model's weights (every tensor of its ``state_dict``) and resolved config,
the explainer's resolved config and the seed. Any change misses; nothing else does. (The MLLM
answers have their own content cache, :class:`harness.mllm.stage.AnswerCache`.) Entries are
``.npz`` files written to a temporary name and renamed, so a job killed mid-write (even with
SIGKILL) leaves no half entry; the temporary name names its owner, so what a killed job left is
removed when a sweep starts (:mod:`harness.ownership`). Each entry carries the SHA-256 of its
arrays: a damaged entry (truncated, emptied, a flipped bit) is reported, discarded and computed
again. The cache can live beside the tracking store, on a shared disk, so jobs on other
machines reuse each other's work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.ownership import temp_name

log = logging.getLogger(__name__)


def digest(*parts: Any) -> str:
    """SHA-256 of JSON-able parts, numpy arrays and tensors (by dtype, shape and bytes)."""
    h = hashlib.sha256()

    def feed(p: Any) -> None:
        if isinstance(p, torch.Tensor):
            p = p.detach().cpu().contiguous().numpy() if p.dtype != torch.bfloat16 else p.detach().float().cpu().numpy()
        if isinstance(p, np.ndarray):
            h.update(f"{p.dtype}{p.shape}".encode())
            h.update(np.ascontiguousarray(p).tobytes())
        elif isinstance(p, list | tuple) and any(isinstance(q, np.ndarray | torch.Tensor) for q in p):
            for q in p:
                feed(q)
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())

    for part in parts:
        feed(part)
    return h.hexdigest()


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of named arrays (names, dtypes, shapes and bytes), the integrity check of an entry."""
    return digest(*[x for name in sorted(arrays) for x in (name, np.asarray(arrays[name]))])


def model_digest(model: torch.nn.Module) -> str:
    """Content hash of a model's weights and buffers (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(digest(t).encode())
    return h.hexdigest()


class StageCache:
    """``get``/``put`` of named arrays per stage and key under ``root/<stage>/<key[:2]>/<key>.npz``
    (``root=None``: disabled, every lookup misses). Counts hits, misses and damaged entries
    per stage."""

    CHECKSUM = "__sha256__"

    def __init__(self, root: str | Path | None) -> None:
        self.root = None if root is None else Path(root)
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self.damaged: Counter[str] = Counter()

    def _path(self, stage: str, key: str) -> Path:
        assert self.root is not None
        return self.root / stage / key[:2] / f"{key}.npz"

    def get(self, stage: str, key: str) -> dict[str, np.ndarray] | None:
        if self.root is not None:
            path = self._path(stage, key)
            try:
                with np.load(path, allow_pickle=False) as z:
                    out = {k: z[k] for k in z.files}
                stored = str(out.pop(self.CHECKSUM))
                if stored != checksum(out):
                    raise ValueError("its checksum does not match its contents")
                self.hits[stage] += 1
                return out
            except FileNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, a missing checksum, ...: damaged
                log.warning("cache entry %s is damaged (%s: %s): discarded, computing it again",
                            path, type(e).__name__, e)
                self.damaged[stage] += 1
                path.unlink(missing_ok=True)
        self.misses[stage] += 1
        return None

    def put(self, stage: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        if self.root is None:
            return
        path = self._path(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / temp_name(path.name)
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays, **{self.CHECKSUM: np.array(checksum(arrays))})
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def fetch(self, stage: str, key: str, compute: Any) -> dict[str, np.ndarray]:
        """The entry for ``key``, or ``compute()`` stored under it: the one place a stage's
        cache is read, written and counted."""
        if (hit := self.get(stage, key)) is not None:
            return hit
        out = compute()
        self.put(stage, key, out)
        return out

    def counts(self) -> dict[str, float]:
        """``cache_hits_<stage>`` and ``cache_misses_<stage>`` for every stage looked up, and
        ``cache_damaged_<stage>`` where a damaged entry was discarded."""
        stages = sorted(set(self.hits) | set(self.misses))
        return {**{f"cache_hits_{s}": float(self.hits[s]) for s in stages},
                **{f"cache_misses_{s}": float(self.misses[s]) for s in stages},
                **{f"cache_damaged_{s}": float(n) for s, n in sorted(self.damaged.items())}}
