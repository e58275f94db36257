"""Builders for classifiers from the hub, local checkpoints and torchvision.

Each returns a :class:`~harness.models.classifier.Classifier`; the ``model`` config group's
options point their ``_target_`` here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from harness.models.checkpoint import Checkpoint, load_weights, read_checkpoint, resize_for
from harness.models.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from harness.types import HarnessError

log = logging.getLogger(__name__)

OFFLINE_HELP = (
    "Either point the harness at weights on disk: model.checkpoint=/path/to/weights "
    "(a .pth/.safetensors state_dict or a timm checkpoint); or make the hub cache available "
    "(set HF_HOME or model.cache_dir to a folder that already holds the model, and "
    "HF_HUB_OFFLINE=1 to stop network look-ups); or run where the hub can be reached."
)


def preprocessing(
    explicit: dict[str, Any], checkpoint: Checkpoint | None, default: dict[str, Any], default_source: str,
    built_size: int | None = None, built_source: str | None = None, fixed_size: int | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Each of ``input_size``, ``resize``, ``mean``, ``std`` and ``interpolation`` from, in
    order: the explicit setting, the checkpoint's metadata, the size the network was built at
    (``built_size``; its crop is then off unless set), the library's default. Returns the
    values and where each came from; a warning when the input size is not the one the network
    was built for, an error when the network takes ``fixed_size`` inputs only."""
    if built_size is not None and built_size == default.get("input_size"):
        built_size = None  # the default's own size: its crop applies
    ck = checkpoint.meta if checkpoint is not None else {}
    ck_source = checkpoint.meta_source if checkpoint is not None else None
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def pick(key: str, *candidates: tuple[Any, str | None]) -> None:
        for value, source in candidates:
            if value is not None and source is not None:
                values[key], sources[key] = value, source
                return
        values[key] = None

    pick("input_size", (explicit.get("input_size"), "model.input_size"), (ck.get("input_size"), ck_source),
         (built_size, built_source), (default.get("input_size"), default_source))
    size = int(values["input_size"])
    built_here = sources.get("input_size") == built_source and built_source is not None
    if "resize" in explicit and explicit["resize"] is not None:
        values["resize"], sources["resize"] = int(explicit["resize"]), "model.resize"
    elif "resize" in ck:
        values["resize"], sources["resize"] = ck["resize"], ck_source
    elif ck.get("crop_pct"):
        values["resize"], sources["resize"] = resize_for(size, ck["crop_pct"]), f"crop_pct {ck['crop_pct']} of {ck_source}"
    elif ck.get("input_size") or built_here:  # a size of its own: no crop percentage of another size
        values["resize"], sources["resize"] = None, ck_source if ck.get("input_size") else built_source
    elif "resize" in default:
        values["resize"], sources["resize"] = default["resize"], default_source
    elif default.get("crop_pct"):
        values["resize"] = resize_for(size, default["crop_pct"])
        sources["resize"] = f"crop_pct {default['crop_pct']} of {default_source}"
    else:
        values["resize"], sources["resize"] = None, default_source
    for key in ("mean", "std", "interpolation"):
        pick(key, (explicit.get(key), f"model.{key}"), (ck.get(key), ck_source), (default.get(key), default_source))
    values["mean"] = tuple(float(v) for v in (values["mean"] or IMAGENET_MEAN))
    values["std"] = tuple(float(v) for v in (values["std"] or IMAGENET_STD))
    values["interpolation"] = values["interpolation"] or "bilinear"
    if fixed_size is not None and size != fixed_size:
        raise HarnessError(f"model.input_size={size} (from {sources['input_size']}), but the network takes "
                           f"{fixed_size} px inputs only: set model.input_size={fixed_size}, or build it for "
                           f"{size} px (model.kwargs.img_size={size}, or model.kwargs.dynamic_img_size=true)")
    # the size the checkpoint records it was trained at, else the one it was built for
    native = ck.get("input_size") or built_size or default.get("input_size")
    if native is not None and size != int(native):
        log.warning("preprocessing feeds %d px images to a network built for %d px (input_size from %s): "
                    "set model.input_size=%d if that is not meant", size, int(native), sources["input_size"],
                    int(native))
    return values, sources


def _built_size(net: nn.Module) -> int | None:
    """The input side a network with a fixed input (a timm ViT's patch embedding, torchvision's
    ``VisionTransformer.image_size``) was built for."""
    size = getattr(getattr(net, "patch_embed", None), "img_size", None) or getattr(net, "image_size", None)
    if size is None or getattr(net, "dynamic_img_size", False):
        return None
    return int(size[-1] if isinstance(size, tuple | list) else size)


def timm_model(
    name: str,
    pretrained: bool = False,
    checkpoint: str | None = None,
    key_map: Any = None,
    cache_dir: str | None = None,
    num_classes: int | None = None,
    input_size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    kwargs: dict[str, Any] | None = None,
    device: str = "cpu",
) -> Classifier:
    """Any timm model by name.

    Args:
        name: timm model name (``vit_base_patch16_224``, ``resnet50``, ...).
        pretrained: download (or read from the hub cache) the default pretrained weights.
        checkpoint: a local weights file (or a folder with ``model.safetensors``) instead of the
            hub (wins over ``pretrained``); see :mod:`harness.models.checkpoint`.
        key_map: ``[pattern, replacement]`` pairs renaming the checkpoint's keys.
        cache_dir: hub cache folder (defaults to the hub's own, e.g. ``$HF_HOME``).
        num_classes: classifier head size (``None``: the model's default).
        input_size, resize, mean, std, interpolation: preprocessing; ``None`` takes, in order,
            the checkpoint's metadata, the image size the network was built at (``kwargs.img_size``;
            no crop then) and the model's pretrained config (timm's ``pretrained_cfg``, ``resize``
            from its crop percentage as timm's eval transform does).
        kwargs: further ``timm.create_model`` arguments (``img_size``, ``patch_size``, ``depth``...).
    """
    import timm

    kwargs = dict(kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if cache_dir:
        kwargs["cache_dir"] = cache_dir
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise HarnessError(f"timm has no model {name!r}; similar names: {', '.join(close) or 'none'}")
    ckpt = read_checkpoint(checkpoint, key_map) if checkpoint else None
    use_hub = pretrained and not checkpoint
    try:
        net = timm.create_model(name, pretrained=use_hub, **kwargs)
    except HarnessError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of timm or the hub becomes one message
        if not use_hub:
            raise HarnessError(f"timm.create_model({name!r}, {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) "
                               f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from None
        raise HarnessError(
            f"pretrained weights for timm model {name!r} could not be loaded from the hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else 'no details'}). "
            + OFFLINE_HELP
        ) from None
    if ckpt is not None:
        load_weights(net, ckpt)
    cfg = dict(getattr(net, "pretrained_cfg", {}) or {})
    default = {"input_size": int(cfg.get("input_size", (3, 224, 224))[-1]), "crop_pct": cfg.get("crop_pct"),
               "mean": cfg.get("mean"), "std": cfg.get("std"), "interpolation": cfg.get("interpolation")}
    values, sources = preprocessing(
        {"input_size": input_size, "resize": resize, "mean": mean, "std": std, "interpolation": interpolation},
        ckpt, default, f"timm's pretrained_cfg of {name}", _built_size(net), "model.kwargs.img_size",
        _built_size(net))
    model = Classifier(net, **values, sources=sources).to(device).eval()
    log.info("model %s: %s", name, model.describe())
    return model


def cifar_resnet(
    depth: int = 20,
    checkpoint: str | None = None,
    key_map: Any = None,
    num_classes: int = 10,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: str = "cpu",
) -> Classifier:
    """The CIFAR ResNet of :mod:`harness.models.cifar_resnet`, at 32×32, from a checkpoint."""
    from harness.models.cifar_resnet import CifarResNet

    net = CifarResNet(depth=depth, num_classes=num_classes)
    if checkpoint:
        load_weights(net, checkpoint, key_map)
    return Classifier(net, input_size=32, mean=mean, std=std).to(device).eval()


def torchvision_model(
    name: str,
    weights: str | None = None,
    checkpoint: str | None = None,
    key_map: Any = None,
    fused: bool = False,
    num_classes: int | None = None,
    input_size: int | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    kwargs: dict[str, Any] | None = None,
    device: str = "cpu",
) -> Classifier:
    """Any ``torchvision.models`` classifier, weights from a local file or torchvision's cache.

    Args:
        name: a name of ``torchvision.models.list_models()`` (``resnet50``, ``vit_b_16``,
            ``convnext_tiny``...), or, with ``fused``, of ``torchvision.models.quantization``.
        weights: a weights enum name of the model (``DEFAULT``, ``IMAGENET1K_V2``...), read from
            torchvision's cache (``$TORCH_HOME/hub/checkpoints``) or downloaded; ``None``: none.
        checkpoint: a local weights file (wins over ``weights``); see
            :mod:`harness.models.checkpoint`.
        key_map: ``[pattern, replacement]`` pairs renaming the checkpoint's keys.
        fused: build the quantization-ready float model and fuse conv+BN+ReLU before loading,
            for checkpoints saved from a fused model.
        num_classes: head size (``None``: the weights' number of categories, else 1000).
        input_size, resize, mean, std, interpolation: preprocessing; ``None`` takes the
            checkpoint's metadata, then the weights' own eval transform, then the ImageNet
            evaluation default (224 px crop of 256, ImageNet mean and std, bilinear).
        kwargs: further arguments of the model's constructor (``dropout``...).
    """
    import torchvision

    if fused:
        ns: Any = torchvision.models.quantization
        if not hasattr(ns, name):
            raise HarnessError(f"torchvision.models.quantization has no model {name!r} (model.fused=true); valid: "
                               + ", ".join(n for n in dir(ns) if n.islower() and not n.startswith("_")))
        builder = getattr(ns, name)
    else:
        valid = torchvision.models.list_models(module=torchvision.models)
        if name not in valid:
            import difflib

            near = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
            raise HarnessError(f"torchvision has no classification model {name!r}; "
                               f"{'did you mean ' + ' or '.join(near) + '? ' if near else ''}valid: {', '.join(valid)}")
        builder = torchvision.models.get_model_builder(name)
    enum = None
    if weights and not checkpoint:
        try:
            enum = torchvision.models.get_model_weights(name)[weights] if weights != "DEFAULT" else \
                torchvision.models.get_model_weights(name).DEFAULT
        except (KeyError, ValueError):
            names = [w.name for w in torchvision.models.get_model_weights(name)]
            raise HarnessError(f"model.weights={weights!r} is not a weights name of torchvision's {name}; "
                               f"valid: DEFAULT, {', '.join(names)}") from None
    ckpt = read_checkpoint(checkpoint, key_map) if checkpoint else None
    n_cls = num_classes or (len(enum.meta["categories"]) if enum is not None else 1000)
    args: dict[str, Any] = {**(kwargs or {}), "weights": None, "num_classes": n_cls}
    if fused:
        args["quantize"] = False
    try:
        net = builder(**args).eval()
    except (TypeError, ValueError) as e:
        raise HarnessError(f"torchvision's {name}({', '.join(f'{k}={v!r}' for k, v in args.items())}) failed: {e}") from None
    if fused:
        net.fuse_model()
    if ckpt is not None:
        load_weights(net, ckpt)
    elif enum is not None:
        try:
            sd = enum.get_state_dict(progress=False, weights_only=True)  # a cached file runs no code either
        except Exception as e:  # noqa: BLE001 - offline and not cached, or a bad file: say which
            import torch.hub

            cached = Path(torch.hub.get_dir()) / "checkpoints" / enum.url.rsplit("/", 1)[-1]
            if cached.is_file():
                raise HarnessError(f"torchvision weights {name}.{enum.name} in the cache ({cached}) cannot be read "
                                   f"as tensors only ({type(e).__name__}: {str(e).splitlines()[0][:200]}); replace "
                                   "the file, or give a local file as model.checkpoint=/path/to/weights.pth") from None
            raise HarnessError(
                f"torchvision weights {name}.{enum.name} are not in the cache ({cached}) and could not be downloaded "
                f"({type(e).__name__}). Copy that file there (or set TORCH_HOME to a folder whose hub/checkpoints "
                "holds it), or give a local file as model.checkpoint=/path/to/weights.pth") from None
        net.load_state_dict(sd)
    default: dict[str, Any] = {"input_size": 224, "resize": 256, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                               "interpolation": "bilinear"}
    source = "the ImageNet evaluation default"
    if enum is not None:
        t = enum.transforms()
        default = {"input_size": int(t.crop_size[0]), "resize": int(t.resize_size[0]), "mean": t.mean, "std": t.std,
                   "interpolation": t.interpolation.value}
        source = f"the eval transform of {name}.{enum.name}"
    values, sources = preprocessing(
        {"input_size": input_size, "resize": resize, "mean": mean, "std": std, "interpolation": interpolation},
        ckpt, default, source, _built_size(net), f"{name}'s image_size", _built_size(net))
    model = Classifier(net, **values, sources=sources).to(device).eval()
    log.info("model torchvision %s: %s", name, model.describe())
    return model
