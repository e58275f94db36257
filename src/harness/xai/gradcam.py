"""Grad-CAM for CNNs (last convolutional stage) and ViTs (the token grid of a block)."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from harness.types import HarnessError
from harness.xai.base import Explainer, ModelCost, is_vit, network


@contextmanager
def capture(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record ``module``'s output (``"act"``) during forward; the hook is removed on exit,
    errors included."""
    store: dict[str, torch.Tensor] = {}

    def hook(_m, _inp, out):
        store["act"] = out[0] if isinstance(out, tuple) else out

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def last_conv_stage(model: nn.Module, x: torch.Tensor) -> str:
    """Name of the last module whose output is a spatial feature map ``[N, C, H, W]`` (H, W > 1)
    of the images themselves: probed with two images, so a map of windows or patches (a Swin's
    window partition) is not taken for one."""
    net = network(model)
    found: list[str] = []
    handles = []
    for name, m in net.named_modules():
        if name and not list(m.children()):
            handles.append(m.register_forward_hook(
                lambda _m, _i, out, name=name: found.append(name)
                if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[0] == 2 and min(out.shape[2:]) > 1
                else None))
    try:
        with torch.no_grad():
            model(torch.cat([x[:1], x[:1]]))
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise HarnessError("Grad-CAM found no spatial feature map in this model; set xai.layer")
    return found[-1]


class GradCAM(Explainer):
    """Gradient-weighted class activation maps.

    For CNNs the feature map is, by default, the output of the last module that still has a
    spatial grid; for timm ViTs it is a token output (``layer: auto`` = the last block's first
    LayerNorm, the last place where patch tokens still reach a class-token head), with the
    class and other prefix tokens dropped and the patch tokens put back on their grid. Channel weights are the spatially averaged gradients of the target logit; the map
    is ``ReLU(sum_c w_c A_c)``, upsampled bilinearly to the input size.

    References:
        Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
        Localization", ICCV 2017.

    Args:
        layer: ``auto`` or the dotted name of a module inside the network (e.g. ``layer4``,
            ``blocks.10``).
        relu: apply the ReLU of the paper (off: signed map).
    """

    needs_gradients = True

    def __init__(self, layer: str = "auto", relu: bool = True) -> None:
        self.layer = layer
        self.relu = bool(relu)
        self._auto: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # net -> {(H, W): name}

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """One gradient (to the feature map; ``layer: auto`` on a CNN also probes one image once
        per network and input size to find the layer, not counted)."""
        return ModelCost(backward=1)

    def _module(self, model: nn.Module, x: torch.Tensor) -> nn.Module:
        net = network(model)
        name = self.layer
        if name == "auto":
            # In a class-token ViT the last block's patch outputs never reach the head (zero
            # gradient); its first norm's output does, through the last attention.
            if is_vit(model):
                name = f"blocks.{len(net.blocks) - 1}.norm1"
            else:
                found = self._auto.setdefault(net, {})
                name = found.get(tuple(x.shape[1:])) or found.setdefault(tuple(x.shape[1:]), last_conv_stage(model, x))
        try:
            return net.get_submodule(name)
        except AttributeError:
            raise HarnessError(f"xai.layer={name!r} is not a module of {type(net).__name__}") from None

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        module = self._module(model, x)
        with capture(module) as store, torch.enable_grad():
            out = model(x.detach().requires_grad_(True))
            act = store["act"]
            (grad,) = torch.autograd.grad(out.gather(1, targets[:, None]).sum(), act)
        if act.ndim == 3:  # ViT tokens [N, T, D] -> [N, D, gh, gw]
            net = network(model)
            prefix = getattr(net, "num_prefix_tokens", 1)
            gh, gw = net.patch_embed.grid_size
            act, grad = (t[:, prefix:].transpose(1, 2).reshape(len(x), -1, gh, gw) for t in (act, grad))
        elif act.ndim != 4 or len(act) != len(x):
            raise HarnessError(f"Grad-CAM needs a [N, C, H, W] or token output with one map per image, got "
                               f"{tuple(act.shape)} for {len(x)} images: set xai.layer to such a module")
        cam = (grad.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True)
        if self.relu:
            cam = cam.clamp_min(0)
        return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].detach()
