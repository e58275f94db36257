"""Concept Relevance Propagation: LRP conditioned on the channels of a layer, one heatmap per concept.

LRP sends the target logit back through the network; at a chosen layer the relevance of each
channel (a *concept*) is the relevance that flows through it. Keeping only one channel's share
at that layer and propagating on gives the concept-conditional heatmap: where in the image the
evidence for that concept lies. The rules below the layer are linear in the relevance they are
given, so the conditional maps of all channels add up to the unconditional LRP map
(``tests/test_crp.py``).

Relevance at a layer follows each rule set's own convention: with zennit's rules (CNNs,
:class:`~harness.xai.lrp.LRP`) the modified gradient at a tensor *is* its relevance; with the
harness's AttnLRP rules for timm ViTs (:class:`~harness.xai.transformer_lrp.TransformerLRP`)
relevance is the tensor times its modified gradient. Either way the condition is a mask on the
gradient at the layer's output, applied by a tensor hook for the one backward pass.

Cost: one LRP pass finds each image's top-k concepts, a second pass over the images repeated k
times (``concept_batch`` rows at a time) gives their k conditional maps: (1 + k) backward
passes for k maps (1.2 k for k = 5); given the concepts (a concept atlas), one pass per map.

References:
    Achtibat, Dreyer, Eisenbraun, Bosse, Wiegand, Samek & Lapuschkin, "From attribution maps to
    human-understandable explanations through Concept Relevance Propagation", Nature Machine
    Intelligence 5, 2023.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.types import HarnessError
from harness.xai.base import Explainer, ModelCost, is_vit, network


@dataclass
class Concepts:
    """The concepts of a batch of images at one layer.

    ``relevance``: ``[N, C]`` relevance of every channel; ``ids``: ``[N, k]`` the top-k channels
    by relevance; ``shares``: ``[N, k]`` their relevance over the layer's total absolute
    relevance (in [-1, 1]; the shares of all channels add up to the layer's net share); ``maps``:
    ``[N, k, H, W]`` their conditional heatmaps; ``full``: ``[N, H, W]`` the unconditional map.
    """

    layer: str
    relevance: torch.Tensor
    ids: torch.Tensor
    shares: torch.Tensor
    maps: torch.Tensor
    full: torch.Tensor | None = None


def default_layer(model: nn.Module) -> str:
    """``auto``: a ViT's last-but-one block (its output still feeds every token to the class
    token), a CNN's last module with a spatial feature map (Grad-CAM's choice)."""
    net = network(model)
    if is_vit(model):
        return f"blocks.{max(len(net.blocks) - 2, 0)}"
    from harness.xai.gradcam import last_conv_stage

    size = getattr(model, "input_size", 32)
    return last_conv_stage(model, torch.zeros(1, 3, size, size, device=next(model.parameters()).device))


@contextmanager
def at_layer(module: nn.Module, mask: _OneHot | None, store: dict[str, torch.Tensor]) -> Iterator[None]:
    """During one forward and backward pass: ``store["act"]`` the module's output,
    ``store["grad"]`` the (modified) gradient arriving at it, multiplied by ``mask`` (broadcast
    as ``[N, C, 1, 1]`` for feature maps, ``[N, 1, C]`` for tokens) before it goes on."""
    def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        if not isinstance(out, torch.Tensor):
            raise HarnessError(f"CRP: layer {type(_m).__name__} returns {type(out).__name__}, not a tensor")
        store["act"] = out.detach()

        def on_grad(g: torch.Tensor) -> torch.Tensor:
            store["grad"] = g.detach()
            if mask is None:
                return g
            m = mask.to(g)
            m = m[:, :, None, None] if g.ndim == 4 else m[:, None, :] if g.ndim == 3 else m
            return g * m

        if out.requires_grad:
            out.register_hook(on_grad)

    # The hook must run after the LRP rules' own forward hooks, which are registered later (inside
    # the explainer's composite context): zennit >= 1.0 wraps a module's output in a new tensor and
    # takes the rule's incoming relevance there, so a mask on the bare output would never reach the
    # rule (the conditional map would be the full map). A forward pre-hook adds it, last, per call.
    posts: list[Any] = []

    def arm(_m: nn.Module, _inp: Any) -> None:
        while posts:
            posts.pop().remove()
        posts.append(module.register_forward_hook(hook))

    handle = module.register_forward_pre_hook(arm)
    try:
        yield
    finally:
        handle.remove()
        while posts:
            posts.pop().remove()


def channel_relevance(act: torch.Tensor, grad: torch.Tensor, times_input: bool) -> torch.Tensor:
    """Relevance at a layer per channel and position: ``[N, C, h, w]`` (tokens: ``[N, C, T]``)."""
    rel = act * grad if times_input else grad
    return rel.transpose(1, 2) if rel.ndim == 3 else rel


class CRP(Explainer):
    """Concept Relevance Propagation (Achtibat et al. 2023): see the module doc.

    The job's map is the sum of the top-k concepts' conditional maps (the part of the LRP map
    those concepts carry); :meth:`concepts` gives each of them with its relevance share.

    Args:
        layer: ``auto`` or the dotted name of a module of the network whose output channels are
            the concepts (e.g. ``layer3`` of a ResNet, ``features.17`` of MobileNetV2,
            ``blocks.2`` of a ViT).
        top_k: concepts per image.
        concept_batch: rows (image x concept) per conditional pass.
        cnn: the LRP explainer for CNNs (``conf/xai/lrp.yaml``).
        vit: the AttnLRP explainer for timm ViTs (``conf/xai/attnlrp.yaml``).
        reference: the concept atlas's reference images (an :class:`~harness.types.ImageSet`,
            built from a dataset config); ``None``: the job's images.
        top_m: reference images per concept in the atlas.
        n_concepts: concepts per image scored by concept faithfulness.
        n_prototypes: PCX prototypes per class.
    """

    needs_gradients = True
    patches_model = True
    patches_scoped = True  # the inner rules' patches are scoped; the layer hook is removed on exit

    def __init__(self, layer: str = "auto", top_k: int = 5, concept_batch: int = 256, cnn: Any = None,
                 vit: Any = None, reference: Any = None, top_m: int = 8, n_concepts: int = 16,
                 n_prototypes: int = 4) -> None:
        from harness.xai.lrp import LRP
        from harness.xai.transformer_lrp import TransformerLRP

        if int(top_k) < 1:
            raise HarnessError(f"xai.top_k={top_k} is not valid: at least 1 concept")
        self.layer = str(layer)
        self.top_k = int(top_k)
        self.concept_batch = max(1, int(concept_batch))
        self.cnn = cnn if cnn is not None else LRP()
        self.vit = vit if vit is not None else TransformerLRP()
        self.reference = reference
        self.top_m, self.n_concepts, self.n_prototypes = int(top_m), int(n_concepts), int(n_prototypes)
        for name in ("top_m", "n_concepts", "n_prototypes"):
            if getattr(self, name) < 1:
                raise HarnessError(f"xai.{name}={getattr(self, name)} is not valid: at least 1")

    def _inner(self, model: nn.Module) -> tuple[Explainer, bool]:
        return (self.vit, True) if is_vit(model) else (self.cnn, False)

    def unsupported(self, model: nn.Module) -> str | None:
        inner, _ = self._inner(model)
        if (reason := inner.unsupported(model)) is not None:
            return reason
        try:
            self._module(model)
        except HarnessError as e:
            return str(e)
        return None

    def layer_name(self, model: nn.Module) -> str:
        return default_layer(model) if self.layer == "auto" else self.layer

    def _module(self, model: nn.Module) -> nn.Module:
        net, name = network(model), self.layer_name(model)
        try:
            return net.get_submodule(name)
        except AttributeError:
            raise HarnessError(f"xai.layer={name!r} is not a module of {type(net).__name__}") from None

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """One LRP pass for the concepts' relevance, then one per concept map."""
        return ModelCost(backward=1 + self.top_k)

    def layer_relevance(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One LRP pass: the unconditional map ``[N, H, W]``, the layer's relevance per channel
        and position (``[N, C, h, w]``, tokens ``[N, C, T]``) and its activation (same shape)."""
        inner, times_input = self._inner(model)
        store: dict[str, torch.Tensor] = {}
        with at_layer(self._module(model), None, store):
            full = inner.explain(model, x, targets)
        if "grad" not in store:
            raise HarnessError(f"CRP: no relevance reached layer {self.layer_name(model)!r} (not on the path to the logits?)")
        full = full.sum(1) if full.ndim == 4 else full
        act = store["act"].transpose(1, 2) if store["act"].ndim == 3 else store["act"]
        return full.detach(), channel_relevance(store["act"], store["grad"], times_input), act

    def conditional(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor, channels: torch.Tensor,
                    ) -> torch.Tensor:
        """``[N, k, H, W]``: image i's map conditioned on each channel ``channels[i, j]``."""
        inner, _ = self._inner(model)
        n, k = channels.shape
        rows_x = x.repeat_interleave(k, 0)
        rows_t = targets.repeat_interleave(k, 0)
        rows_c = channels.reshape(-1)
        module = self._module(model)
        out = []
        for i in range(0, len(rows_x), self.concept_batch):
            sl = slice(i, i + self.concept_batch)
            with at_layer(module, _OneHot(rows_c[sl]), {}):
                m = inner.explain(model, rows_x[sl], rows_t[sl])
            out.append((m.sum(1) if m.ndim == 4 else m).detach())
        return torch.cat(out).reshape(n, k, *x.shape[-2:])

    def concepts(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor, top_k: int | None = None,
                 ) -> Concepts:
        """Each image's top-k concepts by relevance, their shares and conditional maps."""
        k = self.top_k if top_k is None else int(top_k)
        full, rel, _ = self.layer_relevance(model, x, targets)
        per_channel = rel.flatten(2).sum(2)  # [N, C]
        k = min(k, per_channel.shape[1])
        values, ids = per_channel.topk(k, dim=1)
        total = per_channel.abs().sum(1, keepdim=True)
        shares = values / total.clamp_min(1e-12)
        maps = self.conditional(model, x, targets, ids)
        return Concepts(self.layer_name(model), per_channel, ids, shares, maps, full)

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.concepts(model, x, targets).maps.sum(1)


class _OneHot:
    """A channel mask built when the layer's width is known: rows select ``channels[i]``."""

    def __init__(self, channels: torch.Tensor) -> None:
        self.channels = channels

    def to(self, g: torch.Tensor) -> torch.Tensor:
        width = g.shape[1] if g.ndim == 4 else g.shape[-1]
        m = torch.zeros(len(self.channels), width, dtype=g.dtype, device=g.device)
        return m.scatter_(1, self.channels.to(g.device).long()[:, None], 1.0)
