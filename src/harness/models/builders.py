"""Builders for classifiers from the hub, local checkpoints and torchvision.

Each returns a :class:`~harness.models.classifier.Classifier`; the ``model`` config group's
options point their ``_target_`` here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.models.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from harness.types import HarnessError

OFFLINE_HELP = (
    "Either point the harness at weights on disk: model.checkpoint=/path/to/weights "
    "(a .pth/.safetensors state_dict or a timm checkpoint); or make the hub cache available "
    "(set HF_HOME or model.cache_dir to a folder that already holds the model, and "
    "HF_HUB_OFFLINE=1 to stop network look-ups); or run where the hub can be reached."
)


def _load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise HarnessError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(p))
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt file, pickle with code, TorchScript archive
            raise HarnessError(
                f"cannot read checkpoint {p} as tensors only ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                "The harness loads no checkpoint that can run code: save the weights alone "
                "(torch.save(model.state_dict(), path), or safetensors) and point at that file") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise HarnessError(f"checkpoint {p} holds no state_dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_weights(net: nn.Module, path: str | os.PathLike) -> None:
    """Load a state_dict file strictly, with a readable message on mismatch."""
    try:
        net.load_state_dict(_load_state_dict(path))
    except RuntimeError as e:
        raise HarnessError(f"checkpoint {path} does not fit the model: {str(e)[:800]}") from None


def timm_model(
    name: str,
    pretrained: bool = False,
    checkpoint: str | None = None,
    cache_dir: str | None = None,
    num_classes: int | None = None,
    input_size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    device: str = "cpu",
) -> Classifier:
    """Any timm model by name.

    Args:
        name: timm model name (``vit_base_patch16_224``, ``resnet50``, ...).
        pretrained: download (or read from the hub cache) the default pretrained weights.
        checkpoint: a local weights file instead of the hub (wins over ``pretrained``).
        cache_dir: hub cache folder (defaults to the hub's own, e.g. ``$HF_HOME``).
        num_classes: classifier head size (``None``: the model's default).
        input_size, resize, mean, std: preprocessing; ``None`` takes the model's pretrained
            config (timm's ``pretrained_cfg``): ``resize`` from its crop percentage.
        model_kwargs: extra ``timm.create_model`` arguments.
    """
    import timm

    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if cache_dir:
        kwargs["cache_dir"] = cache_dir
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise HarnessError(f"timm has no model {name!r}; similar names: {', '.join(close) or 'none'}")
    use_hub = pretrained and not checkpoint
    try:
        net = timm.create_model(name, pretrained=use_hub, **kwargs)
    except Exception as e:
        if not use_hub:
            raise
        raise HarnessError(
            f"pretrained weights for timm model {name!r} could not be loaded from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else 'no details'}). "
            + OFFLINE_HELP
        ) from None
    if checkpoint:
        load_weights(net, checkpoint)
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    size = input_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    if resize is None and cfg.get("crop_pct"):
        resize = int(round(size / float(cfg["crop_pct"])))
    return Classifier(
        net,
        input_size=size,
        mean=mean or cfg.get("mean", IMAGENET_MEAN),
        std=std or cfg.get("std", IMAGENET_STD),
        resize=resize,
    ).to(device).eval()


def cifar_resnet(
    depth: int = 20,
    checkpoint: str | None = None,
    num_classes: int = 10,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: str = "cpu",
) -> Classifier:
    """The CIFAR ResNet of :mod:`harness.models.cifar_resnet`, at 32×32, from a checkpoint."""
    from harness.models.cifar_resnet import CifarResNet

    net = CifarResNet(depth=depth, num_classes=num_classes)
    if checkpoint:
        load_weights(net, checkpoint)
    return Classifier(net, input_size=32, mean=mean, std=std).to(device).eval()


def torchvision_model(
    name: str,
    checkpoint: str | None = None,
    fused: bool = False,
    num_classes: int = 1000,
    input_size: int = 224,
    resize: int | None = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: str = "cpu",
) -> Classifier:
    """A torchvision classifier built without weights, then loaded from ``checkpoint``.

    Args:
        name: constructor in ``torchvision.models`` (or, with ``fused``, in
            ``torchvision.models.quantization``).
        fused: build the quantization-ready float model and fuse conv+BN+ReLU before loading,
            for checkpoints saved from a fused model.
    """
    import torchvision

    ns = torchvision.models.quantization if fused else torchvision.models
    if not hasattr(ns, name):
        raise HarnessError(f"torchvision has no model {name!r}")
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if fused:
        kwargs["quantize"] = False
    net = getattr(ns, name)(**kwargs).eval()
    if fused:
        net.fuse_model()
    if checkpoint:
        load_weights(net, checkpoint)
    return Classifier(net, input_size=input_size, mean=mean, std=std, resize=resize).to(device).eval()
