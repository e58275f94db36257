"""The attribution stage: one map per image, computed in batches, cached by content
(the prediction key, the explainer's resolved config, the targets and the seed)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from harness.cache import StageCache, digest


def explain(explainer: Any, model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor,
            batch_size: int, progress: bool = True) -> np.ndarray:
    """Attribution maps ``[N, H, W]`` for ``x``, computed ``batch_size`` images at a time."""
    from tqdm.auto import tqdm

    maps = []
    for i in tqdm(range(0, len(x), batch_size), desc=f"explain ({type(explainer).__name__})",
                  disable=None if progress else True):
        maps.append(np.asarray(explainer(model, x[i : i + batch_size], targets[i : i + batch_size])))
    out = np.concatenate(maps) if maps else np.zeros((0, *x.shape[-2:]), np.float32)
    if out.shape != (len(x), *x.shape[-2:]):
        raise RuntimeError(f"{type(explainer).__name__} returned maps of shape {out.shape}, "
                           f"expected {(len(x), *x.shape[-2:])}")
    return out.astype(np.float32)


def attributions(explainer: Any, model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor,
                 cache: StageCache, *, predictions_key: str, config: Any, seed: int, batch_size: int) -> np.ndarray:
    """The maps of ``explainer`` for ``x`` (from the cache where present), keyed by what decides
    them: the predictions' key (data and model), the explainer's resolved ``config``, the
    targets and the seed."""
    key = digest("attributions", predictions_key, config, targets.numpy(), int(seed))
    return cache.fetch("attributions", key, lambda: {"maps": explain(explainer, model, x, targets, batch_size)})["maps"]
