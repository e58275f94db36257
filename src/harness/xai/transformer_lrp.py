"""LRP for timm vision transformers: AttnLRP and CP-LRP, implemented as modified gradients.

Relevance is computed as *activation × modified gradient*: every layer keeps its exact forward
value, and only its backward is changed so that ``R_in = x ⊙ g_in`` follows the layer's LRP rule
given ``R_out = y ⊙ g_out`` (the formulation of Achtibat et al.; plain sums, such as residual
connections, need no rule in it). The rules, one per operation:

=================  =======================================================================
LayerNorm          identity rule on the normalisation: the standard deviation is treated as
                   a constant, so only the (linear) centring and affine map carry relevance
GELU / SiLU        identity rule: ``R_in = R_out``
Linear, Conv2d     ε-rule (``y / (y + ε sign y)``), or the generalised γ-rule, which boosts
                   contributions of the output's sign by ``γ`` (LXT's vision recipe: γ = 0.05
                   on linear layers, 0.25 on convolutions)
``q @ kᵀ``         AttnLRP: uniform rule, half the relevance to each factor
softmax            AttnLRP: ``R_in = x (R_out − s Σ R_out)``, which in this formulation is
                   the plain softmax gradient
``attn @ v``       AttnLRP: uniform rule; CP-LRP: the attention probabilities are constants,
                   so all relevance flows to the values
=================  =======================================================================

With zero biases and ε = 0, CP-LRP conserves relevance exactly: the input relevance, plus that of
the class token and position embedding, sums to the target logit. AttnLRP's softmax rule is not
conservative by design (its linearisation has a bias term), nor is any rule with biases.

Patches are per module *instance* (an instance ``forward`` attribute, removed on exit, errors
included); no torch or timm class is touched, so other methods in the same process see the
original model.

References:
    Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise
    Relevance Propagation", PLoS ONE 2015.
    Ali et al., "XAI for Transformers: Better Explanations through Conservative Propagation",
    ICML 2022 (CP-LRP).
    Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
    Transformers", ICML 2024.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from harness.types import HarnessError
from harness.xai.base import Explainer, ModelCost, fill_like, is_vit, network

IDENTITY_ACTIVATIONS = {"GELU", "GELUTanh", "QuickGELU", "SiLU", "Swish", "Mish", "Hardswish", "HardSwish"}
MODES = ("attnlrp", "cp")
RULES = ("epsilon", "gamma")


def keep_value(surrogate: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``exact``'s value with ``surrogate``'s gradient."""
    return surrogate + (exact - surrogate).detach()


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + ε sign(z)``, never zero (sign(0) counts as +)."""
    return z.abs().add(max(eps, torch.finfo(z.dtype).tiny)).copysign(z)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor`` (a number or a
    tensor like the input)."""

    @staticmethod
    def forward(ctx, x, factor):  # noqa: ANN001, ANN205 - autograd's signature
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    return _ScaleGrad.apply(x, factor)


class _UniformMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):  # noqa: ANN001, ANN205
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        a, b = ctx.saved_tensors
        return 0.5 * (g @ b.transpose(-2, -1)), 0.5 * (a.transpose(-2, -1) @ g)


def uniform_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` whose relevance splits equally between the factors (AttnLRP's uniform rule)."""
    return _UniformMatmul.apply(a, b)


class _EpsilonRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, eps):  # noqa: ANN001, ANN205
        ctx.save_for_backward(y)
        ctx.eps = eps
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        (y,) = ctx.saved_tensors
        return g * y / stabilize(y, ctx.eps), None


def epsilon_rule(y: torch.Tensor, eps: float) -> torch.Tensor:
    """ε-rule for an affine layer with output ``y``: the gradient scaled by ``y / (y + ε)``."""
    return _EpsilonRule.apply(y, eps)


class _IdentityRule(torch.autograd.Function):
    """``y = fn(x)`` element-wise, with ``R_in = R_out``: the backward is ``g ⊙ y / x``."""

    @staticmethod
    def forward(ctx, x, fn):  # noqa: ANN001, ANN205
        y = fn(x)
        ctx.save_for_backward(y / x.masked_fill(x == 0, 1.0))  # y = 0 where x = 0 for these activations
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        (ratio,) = ctx.saved_tensors
        return g * ratio, None


class _LayerNormIdentity(torch.autograd.Function):
    """LayerNorm over the last ``ndim`` dims whose backward treats the standard deviation as a
    constant: ``g_x = centre(g ⊙ w) / std``. Parameters get no gradient (none is needed)."""

    @staticmethod
    def forward(ctx, x, shape, weight, bias, eps):  # noqa: ANN001, ANN205
        y, _, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(rstd, weight)
        ctx.dims = tuple(range(-len(shape), 0))
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        rstd, weight = ctx.saved_tensors
        gw = g if weight is None else g * weight
        return (gw - gw.mean(ctx.dims, keepdim=True)) * rstd, None, None, None, None


def gamma_rule(layer: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, gamma: float, eps: float) -> torch.Tensor:
    """Generalised γ-rule for a linear or convolutional ``layer(x, weight, bias)``.

    Positive outputs take ``z⁺ = z + γ (x⁺w⁺ + x⁻w⁻ + b⁺)``, negative ones
    ``z⁻ = z + γ (x⁺w⁻ + x⁻w⁺ + b⁻)``; the two extra terms come from one call on the doubled
    input ``[x⁺, x⁻]`` with weights ``[w⁺, w⁻]`` (the mixed term is the rest of ``z``).
    """
    y = layer(x, weight, bias)
    xs = torch.cat([x.clamp(min=0), x.clamp(max=0)], dim=1 if weight.ndim > 2 else -1)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    same = layer(xs, torch.cat([wp, wn], dim=1), None)  # x⁺w⁺ + x⁻w⁻
    bp = bn = 0.0
    if bias is not None:
        shape = (-1,) + (1,) * (weight.ndim - 2)
        bp, bn = bias.clamp(min=0).view(shape), bias.clamp(max=0).view(shape)
    nobias = y if bias is None else y - bias.view((-1,) + (1,) * (weight.ndim - 2))
    z = torch.where(y >= 0, y + gamma * (same + bp), y + gamma * (nobias - same + bn))
    return keep_value(z * (y / stabilize(z, eps)).detach(), y)


def _linear(m: nn.Linear, rule: str, gamma: float, eps: float) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if rule == "gamma" and gamma > 0:
            return gamma_rule(F.linear, x, m.weight, m.bias, gamma, eps)
        return epsilon_rule(F.linear(x, m.weight, m.bias), eps)
    return forward


def _conv(m: nn.Conv2d, rule: str, gamma: float, eps: float) -> Callable:
    def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return m._conv_forward(x, w, b)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if rule == "gamma" and gamma > 0:
            if m.groups != 1:
                raise HarnessError("the γ-rule supports ungrouped convolutions only; use rule=epsilon")
            return gamma_rule(conv, x, m.weight, m.bias, gamma, eps)
        return epsilon_rule(conv(x, m.weight, m.bias), eps)
    return forward


def _layer_norm(m: nn.LayerNorm) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _LayerNormIdentity.apply(x, m.normalized_shape, m.weight, m.bias, m.eps)
    return forward


def _identity_activation(m: nn.Module) -> Callable:
    original = type(m).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        return _IdentityRule.apply(x, lambda t: original(m, t))
    return forward


def _attention(m: nn.Module, mode: str) -> Callable:
    """timm ``Attention.forward`` with AttnLRP's or CP-LRP's relevance flow.

    CP-LRP computes the attention probabilities without gradient (they are constants), so the
    backward is one matmul. AttnLRP, fused (``scaled_dot_product_attention``, as timm runs it by
    default): its softmax rule is the plain softmax gradient, so its two uniform matmul rules
    come down to scaling the gradients of ``v`` by 1/2 and of ``q`` and ``k`` by 1/4 (half at
    ``attn @ v``, half again at ``q @ kᵀ``). The explicit path (when ``fused_attn`` is off)
    applies the same rules op by op; a test checks both agree.
    """
    from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

    def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = m.qkv(x).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = m.q_norm(q), m.k_norm(k)
        if mode == "cp":  # constant attention: only ``attn @ v`` needs a backward
            with torch.no_grad():
                logits = (q * m.scale) @ k.transpose(-2, -1)
                attn = maybe_add_mask(logits, resolve_self_attn_mask(n, logits, attn_mask, is_causal)).softmax(-1)
            out = m.attn_drop(attn) @ v
        elif m.fused_attn:
            q, k, v = scale_grad(q, 0.25), scale_grad(k, 0.25), scale_grad(v, 0.5)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 dropout_p=m.attn_drop.p if m.training else 0.0)
        else:
            q = q * m.scale
            logits = uniform_matmul(q, k.transpose(-2, -1))
            logits = maybe_add_mask(logits, resolve_self_attn_mask(n, logits, attn_mask, is_causal))
            out = uniform_matmul(m.attn_drop(logits.softmax(dim=-1)), v)
        out = m.norm(out.transpose(1, 2).reshape(b, n, m.attn_dim))
        return m.proj_drop(m.proj(out))
    return forward


def _check_supported(net: nn.Module, method: str) -> None:
    if not is_vit(net):
        raise HarnessError(f"{method} implements LRP rules for timm ViTs; {type(net).__name__} is not one "
                           "(for CNNs use xai=lrp)")
    from timm.layers import Attention, Mlp

    if getattr(net, "global_pool", "token") == "map":
        raise HarnessError(f"{method}: attention pooling (global_pool='map') has no LRP rule here; "
                           "use a ViT with token or avg pooling")
    for i, blk in enumerate(net.blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
            raise HarnessError(f"{method} supports timm's standard (ungated) Attention; block {i} has "
                               f"{type(attn).__name__}")
        if type(mlp) is not Mlp:
            raise HarnessError(f"{method} supports timm's Mlp (fc1, activation, fc2); block {i} has "
                               f"{type(mlp).__name__}")


@contextmanager
def lrp_rules(net: nn.Module, mode: str = "attnlrp", rule: str = "epsilon", epsilon: float = 1e-6,
              gamma_linear: float = 0.05, gamma_conv: float = 0.25) -> Iterator[nn.Module]:
    """Within the block, ``net``'s backward pass propagates LRP relevance (see the module doc)."""
    if mode not in MODES:
        raise HarnessError(f"xai.mode={mode!r} is not valid; valid: {', '.join(MODES)}")
    if rule not in RULES:
        raise HarnessError(f"xai.rule={rule!r} is not valid; valid: {', '.join(RULES)}")
    from timm.layers import Attention

    patched: list[nn.Module] = []
    try:
        for m in net.modules():
            if "forward" in vars(m):
                raise HarnessError(f"{type(m).__name__} already has a patched forward; refusing to stack LRP rules")
            if type(m) is Attention:
                fwd = _attention(m, mode)
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                gamma = gamma_linear if isinstance(m, nn.Linear) else gamma_conv
                if (rule == "epsilon" or gamma == 0) and epsilon == 0:
                    continue  # LRP-0 of an affine layer is its plain gradient: nothing to patch
                fwd = (_linear if isinstance(m, nn.Linear) else _conv)(m, rule, gamma, epsilon)
            elif isinstance(m, nn.LayerNorm):
                fwd = _layer_norm(m)
            elif type(m).__name__ in IDENTITY_ACTIVATIONS:
                fwd = _identity_activation(m)
            else:
                continue
            m.forward = fwd
            patched.append(m)
        yield net
    finally:
        for m in patched:
            del m.forward


class TransformerLRP(Explainer):
    """AttnLRP or CP-LRP relevance of the target logit for a timm ViT, at the network's input.

    One forward and one backward pass with the rules of :func:`lrp_rules`; the map is the
    relevance of the normalised input ``(x − mean) / std`` summed over colour channels, i.e.
    ``(x − mean) ⊙ ∂̃y/∂x`` (the LRP counterpart of input × gradient with a ``model_mean``
    baseline).

    Args:
        mode: ``attnlrp`` (AttnLRP: uniform matmul and softmax rules) or ``cp`` (CP-LRP:
            attention probabilities held constant).
        rule: rule of linear and convolutional layers: ``epsilon`` or ``gamma``.
        epsilon: stabiliser of the ε- and γ-rules.
        gamma_linear, gamma_conv: γ of linear and convolutional layers (``rule=gamma``).
    """

    needs_gradients = True
    patches_model = True
    architectures = ("vit",)

    def __init__(self, mode: str = "attnlrp", rule: str = "gamma", epsilon: float = 1e-6,
                 gamma_linear: float = 0.05, gamma_conv: float = 0.25) -> None:
        if mode not in MODES:
            raise HarnessError(f"xai.mode={mode!r} is not valid; valid: {', '.join(MODES)}")
        if rule not in RULES:
            raise HarnessError(f"xai.rule={rule!r} is not valid; valid: {', '.join(RULES)}")
        if float(epsilon) < 0 or float(gamma_linear) < 0 or float(gamma_conv) < 0:
            raise HarnessError("xai.epsilon, xai.gamma_linear and xai.gamma_conv must be >= 0")
        self.mode, self.rule = mode, rule
        self.epsilon = float(epsilon)
        self.gamma_linear, self.gamma_conv = float(gamma_linear), float(gamma_conv)

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        net = network(model)
        _check_supported(net, "attnlrp" if self.mode == "attnlrp" else "cplrp")
        x = x.detach().requires_grad_(True)
        with lrp_rules(net, self.mode, self.rule, self.epsilon, self.gamma_linear, self.gamma_conv), \
                torch.enable_grad():
            out = model(x).gather(1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(out, x)
        ref = fill_like(model, x, "model_mean", "xai.baseline") if hasattr(model, "mean") else torch.zeros_like(x)
        return ((x.detach() - ref) * grad).sum(1)

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        return ModelCost(backward=1)
