"""Small helpers shared by the stages: seeding, config hashing, plain containers."""

from __future__ import annotations

import hashlib
import json
import random
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


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch global RNGs (libraries such as lime read the global ones)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
