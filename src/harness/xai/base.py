"""The explainer interface shared by every XAI method.

An explainer is built from its YAML (hyper-parameters go to the constructor) and called on data:
``explainer(model, inputs, targets) -> np.ndarray`` of shape ``[N, H, W]``, the ``explain_func``
signature Quantus expects, so every metric can re-explain perturbed inputs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from harness.types import HarnessError


def as_tensor(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def image_seed(seed: int, image: torch.Tensor | np.ndarray) -> int:
    """A seed from ``seed`` and an image's bytes: seeded methods give each image the same draws
    whatever batch it is explained in."""
    data = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return (int(seed) ^ zlib.crc32(np.ascontiguousarray(data).tobytes())) % 2**31


def check_fill(value: float | str, what: str) -> float | str:
    """Validate a fill value (see :func:`fill_like`) when a component is built, not mid-run."""
    if isinstance(value, str):
        if value not in ("model_mean", "mean"):
            raise HarnessError(f"{what}={value!r} is not valid: model_mean, mean, or a number in [0, 1]")
        return value
    return float(value)


def fill_like(model: nn.Module | None, x: torch.Tensor, value: float | str, what: str) -> torch.Tensor:
    """A reference image like ``x``: ``"model_mean"`` (the model's normalisation mean, i.e. zero
    in the network's input space), ``"mean"`` (each image's per-channel mean) or a constant."""
    value = check_fill(value, what)
    if value == "model_mean":
        mean = getattr(model, "mean", None)
        if not isinstance(mean, torch.Tensor):
            raise HarnessError(f"{what}=model_mean needs a harness Classifier (it has the mean)")
        return mean.to(x).expand_as(x).contiguous()
    if value == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
    return torch.full_like(x, value)


def network(model: nn.Module) -> nn.Module:
    """The network inside a harness Classifier (or the model itself)."""
    return getattr(model, "net", model)


def is_vit(model: nn.Module) -> bool:
    """A timm-style vision transformer: transformer ``blocks`` over a ``patch_embed`` grid."""
    net = network(model)
    return hasattr(net, "blocks") and hasattr(net, "patch_embed")


def model_device(model: nn.Module | None) -> torch.device:
    """The device of a model's first buffer or parameter (CPU for none)."""
    if model is None:
        return torch.device("cpu")
    for t in (*model.buffers(), *model.parameters()):
        return t.device
    return torch.device("cpu")


def methods_for(arch: str) -> list[str]:
    """The ``xai`` options (from the config group) whose explainer serves ``arch`` (vit or cnn).
    An alias (an option that only names another in its defaults list, e.g. ``shap``) is left
    out: its method is listed under its own name."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from harness import CONF_DIR  # the config group is the registry

    options = {p.stem: OmegaConf.load(p) for p in sorted((CONF_DIR / "xai").glob("*.yaml"))}
    return [name for name, cfg in options.items()
            if "_target_" in cfg and arch in getattr(get_class(cfg._target_), "architectures", (arch,))]


@dataclass(frozen=True)
class ModelCost:
    """The raw model work a method's algorithm needs per image: ``forward`` images pushed through
    the model without gradients and ``backward`` images through forward plus backward;
    ``denoiser``: images through the method's own denoiser (FreeMCG's manifold projection), the
    other network its algorithm runs. The benchmark times these in the same run to report a
    method's overhead over its algorithm."""

    forward: float = 0.0
    backward: float = 0.0
    denoiser: float = 0.0


class Explainer:
    """Base class: subclasses implement :meth:`explain` on tensors.

    Capability metadata, checked before a job starts:
        needs_gradients: the model must be differentiable (no int8 / TorchScript-only models).
        architectures: the model families the method serves: ``vit`` (a timm ViT) and ``cnn``
            (any other network).
        patches_model: the method changes the model while it runs (and must undo it).
        patches_scoped: its patches live in a context manager and a test proves that nothing is
            left behind, errors included; ``isolation: auto`` then runs it in the job's process.
    """

    needs_gradients: ClassVar[bool] = False
    architectures: ClassVar[tuple[str, ...]] = ("vit", "cnn")
    patches_model: ClassVar[bool] = False
    patches_scoped: ClassVar[bool] = False

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unsupported(self, model: nn.Module) -> str | None:
        """Why this method cannot serve ``model``, found from its structure before any work
        (``None``: it can). Methods with structural needs beyond :attr:`architectures` override it."""
        return None

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost | None:
        """The model passes per image this method's algorithm requires at these settings for
        inputs of ``image_size`` (H, W); ``None`` where no such count is meaningful."""
        return None

    def __call__(self, model: nn.Module, inputs: Any, targets: Any, **_: Any) -> np.ndarray:
        dev = model_device(model)
        x = as_tensor(inputs, dev, torch.float32)
        t = as_tensor(targets, dev, torch.long).reshape(-1)
        if x.ndim != 4 or len(t) != len(x):
            raise ValueError(f"expected inputs [N, C, H, W] and N targets, got {tuple(x.shape)} and {len(t)}")
        out = self.explain(model, x, t)
        if out.ndim == 4:
            out = out.sum(1)
        return out.detach().float().cpu().numpy()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
