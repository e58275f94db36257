"""The prediction stage: dataset images through the model's preprocessing, then logits,
cached by content (data, labels, ids, weights, device)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from harness.cache import StageCache, digest, model_digest
from harness.types import TARGETS, HarnessError, ImageSet

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    """A dataset as the model sees it: ``x`` ``[N, 3, S, S]`` in [0, 1], boolean masks
    ``[N, S, S]`` (None without ground truth), labels ``[N]``, and the data's named regions
    (``ImageSet.regions``) as boolean masks ``[N, S, S]`` of the network input."""

    x: torch.Tensor
    masks: np.ndarray | None
    labels: torch.Tensor
    regions: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Predictions:
    """Logits, predicted classes, the class each image is explained for, the cache key later
    stages derive theirs from, and the SHA-256 of the model's weights and buffers."""

    logits: torch.Tensor
    preds: torch.Tensor
    targets: torch.Tensor
    key: str
    model_digest: str = ""


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise HarnessError(f"target={target!r} is not valid; valid: {', '.join(TARGETS)}")
    return target


def model_inputs(model: torch.nn.Module, data: ImageSet) -> Inputs:
    x, masks = model.preprocess(data.images, data.masks)
    regions = {name: model.preprocess(data.images, m)[1] for name, m in data.regions.items()}
    return Inputs(x, masks if data.has_masks else None, torch.from_numpy(data.labels), regions)


def predictions(model: torch.nn.Module, data: ImageSet, inputs: Inputs, cache: StageCache,
                target: str = "label") -> Predictions:
    """Logits of every image (from the cache where present) and the explained classes:
    the true labels (``target=label``) or the model's decisions (``predicted``)."""
    device = str(getattr(model, "mean", torch.zeros(0)).device.type)
    weights = model_digest(model)
    key = digest("predictions", inputs.x, inputs.labels.numpy(), list(data.ids), weights, device)
    logits = torch.from_numpy(cache.fetch("predictions", key, lambda: {"logits": model.predict(inputs.x).numpy()})["logits"])
    if logits.shape[1] != len(data.class_names):
        log.warning("model has %d outputs but the dataset names %d classes", logits.shape[1], len(data.class_names))
    preds = logits.argmax(1)
    return Predictions(logits, preds, inputs.labels if check_target(target) == "label" else preds, key, weights)
