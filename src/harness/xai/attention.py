"""Attention-based maps for timm ViTs: attention rollout and Chefer et al.'s gradient-weighted
relevance.

Both read each block's softmax attention probabilities. timm's ``Attention`` normally calls
``F.scaled_dot_product_attention`` (``fused_attn=True``), which never materialises them, so
:func:`attention_probs` switches every block to the explicit path (``attn.fused_attn = False``)
and records the input of ``attn.attn_drop`` (the probabilities, before attention dropout) with
a forward hook. Flags and hooks are restored on exit, errors included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from harness.types import HarnessError
from harness.xai.base import Explainer, ModelCost, is_vit, methods_for, network


def _attention_modules(model: nn.Module, method: str) -> list[nn.Module]:
    """Each block's timm ``Attention``; a clear error for anything else."""
    if not is_vit(model):
        raise HarnessError(
            f"{method} reads transformer attention and needs a timm ViT; "
            f"{type(network(model)).__name__} is not one (methods that work on CNNs: {', '.join(methods_for('cnn'))})")
    from timm.layers import Attention  # timm is only needed for ViTs

    net = network(model)
    if getattr(net, "cls_token", None) is None:
        raise HarnessError(f"{method} reads the class-token row of the attention; this ViT has no class token")
    mods = [getattr(blk, "attn", None) for blk in net.blocks]
    for i, m in enumerate(mods):
        if not isinstance(m, Attention):
            raise HarnessError(
                f"{method} supports timm's standard Attention; block {i} has "
                f"{type(m).__name__ if m is not None else 'no attn module'}")
    return mods


def _unsupported(model: nn.Module, method: str) -> str | None:
    try:
        _attention_modules(model, method)
    except HarnessError as e:
        return str(e)
    return None


@contextmanager
def attention_probs(mods: list[nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """During a forward pass, record block ``i``'s attention probabilities ``[N, heads, T, T]``
    as ``store[i]``. ``fused_attn`` flags are restored and hooks removed on exit, errors included."""
    store: dict[int, torch.Tensor] = {}
    flags = [m.fused_attn for m in mods]
    handles = []
    try:
        for i, m in enumerate(mods):
            m.fused_attn = False
            handles.append(m.attn_drop.register_forward_hook(
                lambda _m, inp, _out, i=i: store.__setitem__(i, inp[0])))
        yield store
    finally:
        for h in handles:
            h.remove()
        for m, flag in zip(mods, flags):
            m.fused_attn = flag


def _collected(store: dict[int, torch.Tensor], depth: int) -> list[torch.Tensor]:
    if sorted(store) != list(range(depth)):
        raise HarnessError(f"attention was read in {len(store)} of {depth} blocks; this timm "
                           "version's Attention may not pass its probabilities through attn_drop")
    return [store[i] for i in range(depth)]


def _check_start(start_layer: int, depth: int, method: str) -> None:
    if not 0 <= start_layer < depth:
        raise HarnessError(f"{method}: start_layer={start_layer} must be in [0, {depth - 1}] for this ViT")


def _cls_map(model: nn.Module, rel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Class-token row of ``rel`` [N, T, T] over patch tokens, on the patch grid, upsampled to ``x``."""
    net = network(model)
    prefix = getattr(net, "num_prefix_tokens", 1)
    gh, gw = net.patch_embed.grid_size
    row = rel[:, 0, prefix:]
    if row.shape[1] != gh * gw:
        raise HarnessError(f"{row.shape[1]} patch tokens do not fill the {gh}x{gw} patch grid "
                           f"(input {tuple(x.shape[-2:])} vs the model's image size?)")
    grid = row.reshape(len(x), 1, gh, gw).float()
    return F.interpolate(grid, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].detach()


class AttentionRollout(Explainer):
    """Attention rollout: how much the class token draws on each patch through all blocks.

    Per block, heads are fused (mean, max or min), the lowest ``discard_ratio`` share of each
    row's weights is set to zero (the class-token column is always kept), the residual is
    modelled as ``0.5 A + 0.5 I`` and rows are renormalised; the rollout is the product of these
    matrices from ``start_layer`` to the last block. The map is the class-token row over patch
    tokens (other prefix tokens dropped), upsampled bilinearly to the input size.

    Rollout does not depend on the target class: ``targets`` are accepted and ignored.

    References:
        Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020.

    Args:
        head_fusion: ``mean``, ``max`` or ``min`` over heads.
        discard_ratio: share in [0, 1) of the lowest weights per row set to zero.
        start_layer: first block included in the product.
    """

    architectures = ("vit",)

    def __init__(self, head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0) -> None:
        if head_fusion not in ("mean", "max", "min"):
            raise HarnessError(f"xai.head_fusion={head_fusion!r} is not valid: mean, max or min")
        if not 0.0 <= float(discard_ratio) < 1.0:
            raise HarnessError(f"xai.discard_ratio={discard_ratio} must be in [0, 1)")
        self.head_fusion = head_fusion
        self.discard_ratio = float(discard_ratio)
        self.start_layer = int(start_layer)

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """One forward pass that records the attention."""
        return ModelCost(forward=1)

    def unsupported(self, model: nn.Module) -> str | None:
        return _unsupported(model, "attention rollout")

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mods = _attention_modules(model, "attention rollout")
        _check_start(self.start_layer, len(mods), "attention rollout")
        with attention_probs(mods) as store, torch.no_grad():
            model(x)
            attns = _collected(store, len(mods))[self.start_layer:]
        rollout = None
        for attn in attns:
            attn = attn.float()
            a = attn.mean(1) if self.head_fusion == "mean" else getattr(attn, self.head_fusion)(1).values
            k = int(self.discard_ratio * (a.shape[-1] - 1))
            if k:
                rest = a[..., 1:]  # never drop the class-token column
                idx = rest.topk(k, dim=-1, largest=False).indices
                a = torch.cat([a[..., :1], rest.scatter(-1, idx, 0.0)], dim=-1)
            eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
            a = 0.5 * a + 0.5 * eye
            a = a / a.sum(-1, keepdim=True)
            rollout = a if rollout is None else a @ rollout
        return _cls_map(model, rollout, x)


class CheferRelevance(Explainer):
    """Gradient-weighted attention relevance (Chefer et al. 2021, self-attention rule).

    Starting from ``R = I``, each block from ``start_layer`` on updates
    ``R = R + mean_heads((dy_t/dA * A).clamp(min=0)) @ R``, where ``A`` are the block's attention
    probabilities and ``y_t`` the target logit. The map is the class-token row of ``R`` over
    patch tokens, upsampled bilinearly to the input size. Class-specific through the gradients.

    References:
        Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal
        and Encoder-Decoder Transformers", ICCV 2021.

    Args:
        start_layer: first block whose attention updates ``R`` (0: all, as in the paper).
    """

    needs_gradients = True
    architectures = ("vit",)

    def __init__(self, start_layer: int = 0) -> None:
        self.start_layer = int(start_layer)

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """One gradient (to the attention maps)."""
        return ModelCost(backward=1)

    def unsupported(self, model: nn.Module) -> str | None:
        return _unsupported(model, "Chefer relevance")

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mods = _attention_modules(model, "Chefer relevance")
        _check_start(self.start_layer, len(mods), "Chefer relevance")
        with attention_probs(mods) as store, torch.enable_grad():
            out = model(x.detach().requires_grad_(True))
            attns = _collected(store, len(mods))[self.start_layer:]
            grads = torch.autograd.grad(out.gather(1, targets[:, None]).sum(), attns, allow_unused=True)
        rel = None
        for attn, grad in zip(attns, grads):
            attn = attn.detach().float()
            grad = torch.zeros_like(attn) if grad is None else grad.float()
            if rel is None:
                rel = torch.eye(attn.shape[-1], device=attn.device).expand(len(x), -1, -1)
            a = (grad * attn).clamp(min=0).mean(1)
            rel = rel + a @ rel
        return _cls_map(model, rel, x)
