"""Small helpers shared by the stages: seeding, config hashing, plain containers."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


def to_plain(obj: Any) -> Any:
    """OmegaConf containers (and tuples) to plain dicts and lists; other values unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(to_plain(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@contextmanager
def trainer_lock(folder: Any, what: str) -> Iterator[None]:
    """One trainer at a time per cache folder: parallel jobs of a sweep wait for the first one
    (an exclusive ``flock`` on ``folder/.lock``, released when the block ends or the process dies)."""
    import fcntl
    import logging
    from pathlib import Path

    with open(Path(folder) / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger(__name__).info("another process is training this %s (%s): waiting for it", what, folder)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch global RNGs (libraries such as lime read the global ones).

    This changes the caller's RNGs for good: library code seeds inside :func:`seeded` (or
    :func:`rng_restored`) instead, so what ran before and after it draws as if it had not run."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def rng_restored() -> Iterator[None]:
    """Save the global RNG states of Python's ``random``, numpy and torch (CPU, and every CUDA
    device already initialised) and put them back on exit, errors included: whatever the block
    seeds or draws, the caller's random streams go on as if it had not run.

    A CUDA context first made inside the block starts from the seed the block gave it; there
    was no earlier state of it to restore."""
    import torch

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """:func:`seed_everything` for the block only: the caller's RNG states come back on exit."""
    with rng_restored():
        seed_everything(seed)
        yield
