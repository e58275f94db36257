"""Hugging Face image classifiers: ``AutoModelForImageClassification`` with its image processor.

The model comes from a local folder (``save_pretrained``) or the hub (its cache offline). Its
preprocessing comes from, in order: explicit settings, the folder's ``preprocessor_config.json``
(the checkpoint's own metadata), the model's ``config.image_size``, and the defaults of the
model type's image processor class. Processors translate to the :class:`Classifier`'s geometry:
``size: {height, width}`` resizes straight to that size (and ``crop_size`` crops it), ``size:
{shortest_edge}`` resizes the shorter side (with ConvNeXt's ``crop_pct`` rule below 384 px).

A ViT or DeiT (``ViTForImageClassification``, ``DeiTForImageClassification``) is run, with
``as_timm: auto``, as the same network in timm's ``VisionTransformer`` (weights mapped one to one,
DeiT's distillation token as a register token), checked to give the same logits as the Hugging
Face model on a probe input; attention rollout, Chefer relevance, AttnLRP and CP-LRP then apply
as on any timm ViT. Other models (ResNet, ConvNeXt, Swin, ...) run as they are, behind a
module that returns their logits; methods for CNNs and model-agnostic methods serve them.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.models.builders import preprocessing
from harness.models.checkpoint import Checkpoint
from harness.models.classifier import Classifier
from harness.types import HarnessError

log = logging.getLogger(__name__)

RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's numbers
CONVERTIBLE = {"ViTForImageClassification": "vit", "DeiTForImageClassification": "deit"}
ACTIVATIONS = {"gelu": nn.GELU, "gelu_new": partial(nn.GELU, approximate="tanh"),
               "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh")}
HUB_HELP = ("Point model.path at a local folder written by save_pretrained (config.json and the weights; "
            "preprocessor_config.json for the preprocessing), or set HF_HOME / model.cache_dir to a hub cache "
            "that already holds the model, or run once where the hub can be reached.")


class HFLogits(nn.Module):
    """A Hugging Face image classifier as a module from pixel values to logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _processor_preprocessing(proc: Any) -> dict[str, Any]:
    """An image processor's settings in the Classifier's terms (input_size, resize, keep_aspect,
    mean, std, interpolation)."""
    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    size, crop = getattr(proc, "size", None), getattr(proc, "crop_size", None)
    out: dict[str, Any] = {}
    if get(size, "height"):
        out.update(input_size=int(get(size, "height")), resize=None, keep_aspect=False)
    elif get(size, "shortest_edge"):
        edge = int(get(size, "shortest_edge"))
        crop_pct = getattr(proc, "crop_pct", None)
        if crop_pct and edge < 384:  # ConvNeXt: resize edge / crop_pct, then crop edge
            out.update(input_size=edge, resize=int(edge / crop_pct), keep_aspect=True)
        elif crop_pct:  # ConvNeXt at 384 and more: straight to edge x edge
            out.update(input_size=edge, resize=None, keep_aspect=False)
        else:
            out.update(input_size=edge, resize=edge, keep_aspect=True)
    if getattr(proc, "do_center_crop", False) and get(crop, "height"):
        resize = out.get("resize") or out.get("input_size")
        out.update(input_size=int(get(crop, "height")), resize=resize)
    if getattr(proc, "do_normalize", True):
        out["mean"], out["std"] = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = getattr(proc, "resample", None)
    out["interpolation"] = RESAMPLE.get(int(getattr(resample, "value", resample)), None) if resample is not None else None
    return {k: v for k, v in out.items() if v is not None or k == "resize"}


def _default_processor(config: Any) -> Any:
    """The model type's image processor class with its defaults (for folders without one)."""
    from transformers.models.auto import image_processing_auto as auto

    names = auto.IMAGE_PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if not names:
        return None
    name = names.get("pil") or next(iter(names.values())) if isinstance(names, dict) else names[0]
    cls = auto.get_image_processor_class_from_name(name)
    return cls() if cls is not None else None


def _timm_vit(hf: nn.Module) -> nn.Module | None:
    """The Hugging Face ViT/DeiT as timm's VisionTransformer with the same weights, or None
    where the architecture has no one-to-one timm counterpart."""
    kind = CONVERTIBLE.get(type(hf).__name__)
    c = hf.config
    act = ACTIVATIONS.get(str(getattr(c, "hidden_act", "")))
    if kind is None or act is None:
        return None
    from timm.models.vision_transformer import VisionTransformer

    reg = 1 if kind == "deit" else 0  # DeiT's distillation token follows the class token
    net = VisionTransformer(
        img_size=c.image_size, patch_size=c.patch_size, in_chans=c.num_channels, num_classes=c.num_labels,
        embed_dim=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
        mlp_ratio=c.intermediate_size / c.hidden_size, qkv_bias=bool(getattr(c, "qkv_bias", True)),
        reg_tokens=reg, global_pool="token", act_layer=act, norm_layer=partial(nn.LayerNorm, eps=c.layer_norm_eps))
    sd = hf.state_dict()
    p = f"{kind}."
    e = f"{p}embeddings."
    out = {"cls_token": sd[f"{e}cls_token"], "pos_embed": sd[f"{e}position_embeddings"],
           "patch_embed.proj.weight": sd[f"{e}patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd[f"{e}patch_embeddings.projection.bias"],
           "norm.weight": sd[f"{p}layernorm.weight"], "norm.bias": sd[f"{p}layernorm.bias"],
           "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"]}
    if reg:
        out["reg_token"] = sd[f"{e}distillation_token"]
    def take(*names: str) -> torch.Tensor | None:  # module names differ between transformers versions
        return next((sd[n] for n in names if n in sd), None)

    for i in range(c.num_hidden_layers):
        b = f"blocks.{i}."
        hs = (f"{p}layers.{i}.", f"{p}encoder.layer.{i}.")
        for part in ("weight", "bias"):
            qkv = [take(*(f"{h}attention.{new}.{part}" for h in hs), *(f"{h}attention.attention.{old}.{part}" for h in hs))
                   for new, old in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))]
            if all(t is not None for t in qkv):
                out[f"{b}attn.qkv.{part}"] = torch.cat(qkv)  # type: ignore[arg-type]
            for ours, theirs in (("attn.proj", ("attention.o_proj", "attention.output.dense")),
                                 ("mlp.fc1", ("mlp.fc1", "intermediate.dense")), ("mlp.fc2", ("mlp.fc2", "output.dense")),
                                 ("norm1", ("layernorm_before",)), ("norm2", ("layernorm_after",))):
                if (t := take(*(f"{h}{n}.{part}" for h in hs for n in theirs))) is not None:
                    out[f"{b}{ours}.{part}"] = t
    missing, unexpected = net.load_state_dict(out, strict=False)
    if missing or unexpected:
        log.info("not run as a timm ViT: keys %s do not map", (missing or unexpected)[:3])
        return None
    net.eval()
    probe = torch.randn(2, c.num_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = hf.eval()(pixel_values=probe).logits, net(probe)
    err = float((ref - got).abs().max())
    if err > 1e-4 * max(1.0, float(ref.abs().max())):
        log.warning("the timm form of %s differs from it by %.2g on a probe input: run as it is", type(hf).__name__, err)
        return None
    return net


def hf_model(
    path: str,
    revision: str | None = None,
    cache_dir: str | None = None,
    as_timm: str | bool = "auto",
    input_size: int | None = None,
    resize: int | None = None,
    mean: Any = None,
    std: Any = None,
    interpolation: str | None = None,
    device: str = "cpu",
) -> Classifier:
    """A Hugging Face ``AutoModelForImageClassification`` and its preprocessing.

    Args:
        path: a folder written by ``save_pretrained`` or a hub name (``google/vit-base-patch16-224``).
        revision: hub revision (branch, tag or commit).
        cache_dir: hub cache folder (default: the hub's own, ``$HF_HOME``).
        as_timm: ``auto`` runs a ViT or DeiT as the identical timm ViT (checked on a probe), so
            the attention methods apply; ``false`` keeps the Hugging Face module; ``true``
            requires the conversion.
        input_size, resize, mean, std, interpolation: preprocessing; ``None`` takes, in order,
            the folder's ``preprocessor_config.json``, ``config.image_size``, the defaults of the
            model type's image processor.
    """
    if as_timm not in ("auto", True, False):
        raise HarnessError(f"model.as_timm={as_timm!r} is not valid; valid: auto, true, false")
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    local = Path(path).expanduser()
    where = str(local) if local.exists() else path
    opts: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir}
    try:
        config = AutoConfig.from_pretrained(where, **opts)
    except (OSError, ValueError) as e:
        what = "is not a model folder (no config.json)" if local.exists() else "could not be loaded from the hub"
        raise HarnessError(f"model.path={path!r} {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                           + HUB_HELP) from None
    try:
        hf = AutoModelForImageClassification.from_pretrained(where, **opts).eval()
    except ValueError as e:
        raise HarnessError(f"model.path={path!r} is a {type(config).__name__}, which has no image classification "
                           f"model in transformers ({str(e).splitlines()[0][:200]})") from None
    except OSError as e:
        raise HarnessError(f"the weights of model.path={path!r} could not be loaded ({str(e).splitlines()[0][:200]}). "
                           + HUB_HELP) from None
    try:
        proc, proc_source = AutoImageProcessor.from_pretrained(where, **opts), f"the preprocessor_config.json of {path}"
    except (OSError, ValueError):
        proc, proc_source = None, None
    net: nn.Module | None = None
    if as_timm in ("auto", True):
        net = _timm_vit(hf)
        if net is None and as_timm is True:
            raise HarnessError(f"model.as_timm=true: {type(hf).__name__} has no one-to-one timm form here "
                               f"(convertible: {', '.join(CONVERTIBLE)}); set model.as_timm=auto")
    default_proc = _default_processor(config)
    default = _processor_preprocessing(default_proc) if default_proc is not None else {}
    meta = _processor_preprocessing(proc) if proc is not None else {}
    keep_aspect = meta.get("keep_aspect", default.get("keep_aspect", True))
    ckpt = Checkpoint(local, {}, meta, proc_source) if meta else None
    image_size = getattr(config, "image_size", None)
    image_size = int(image_size[-1] if isinstance(image_size, list | tuple) else image_size) if image_size else None
    fixed = image_size if net is not None or config.model_type in ("vit", "deit") else None
    values, sources = preprocessing(
        {"input_size": input_size, "resize": resize, "mean": mean, "std": std, "interpolation": interpolation},
        ckpt, default, f"the defaults of {type(default_proc).__name__}", image_size, "config.image_size", fixed)
    model = Classifier(net if net is not None else HFLogits(hf), **values, keep_aspect=keep_aspect,
                       sources=sources).to(device).eval()
    log.info("model %s (%s%s): %s", path, type(hf).__name__, ", as a timm ViT" if net is not None else "",
             model.describe())
    return model
