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

Cost: the ε-rule is one gradient plus element-wise work. The γ-rule needs, per affine layer,
the forward ``y``, one more product ``|x| |W|ᵀ`` for its denominator and two products in the
backward (:func:`gamma_rule`), so about twice a gradient; ``|W|`` is computed once per
weight and kept by the explainer across calls (:class:`AbsWeights`), backward products run
only over rows that carry relevance, and CP-LRP's query and key rows get no rule at all.

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

import weakref
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
        # y = 0 where x = 0 for these activations: the ratio's 0/0 is 0 there
        ctx.save_for_backward(torch.div(y, x).nan_to_num_(nan=0.0))
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
        gw = g.clone() if weight is None else g * weight
        return gw.sub_(gw.mean(ctx.dims, keepdim=True)).mul_(rstd), None, None, None, None


class _AffineRule:
    """The tensors one affine layer's rule needs, computed once per :func:`lrp_rules` block (not
    per forward): the weight ``[out, in]`` and bias (optionally a block of output rows), ``|W|``
    and ``k |b| + ε'`` for the γ-rule's denominator (``k = γ / (2 + γ)``, ``ε' = ε / (1 + γ/2)``),
    and an optional per-output gradient scale (the fused AttnLRP attention's 1/4, 1/4, 1/2 on
    q, k, v), applied to the saved factor rather than to copies of the weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rule: str, gamma: float, eps: float,
                 rows: slice = slice(None), row_scale: torch.Tensor | None = None,
                 abs_of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        with torch.no_grad():
            w = weight.detach()[rows]
            self.weight = w
            self.bias = None if bias is None else bias.detach()[rows]
            self.scale = None if row_scale is None else row_scale.to(w)
            self.abs_weight = self.den_bias = None
            gamma_on = rule == "gamma" and gamma > 0
            # ε = 0 with the ε-rule is LRP-0: the plain gradient (no factor at all)
            self.eps = max(eps, torch.finfo(w.dtype).tiny) if eps > 0 or gamma_on else None
            if gamma_on:
                self.k = k = gamma / (2 + gamma)
                eps_ = self.eps / (1 + gamma / 2)
                self.abs_weight = w.abs() if abs_of is None else abs_of(weight)[rows]
                self.den_bias = (torch.full((w.shape[0],), eps_, dtype=w.dtype, device=w.device)
                                 if self.bias is None else self.bias.abs().mul_(k).add_(eps_))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _AffineRuleFn.apply(x, self)


class _AffineRuleFn(torch.autograd.Function):
    """``y = x Wᵀ + b`` with the ε- or γ-rule as its backward (see :func:`gamma_rule` for the
    γ-rule's algebra). The forward computes the one factor the backward needs, ``q = y / den``
    (``|y| / den`` is ``q``'s magnitude with ``g``'s sign after multiplying by ``g``), and the
    backward, which may run once, reuses its memory."""

    @staticmethod
    def forward(ctx, x, rule):  # noqa: ANN001, ANN205
        y = F.linear(x, rule.weight, rule.bias)
        ctx.rule, ctx.done = rule, False
        if rule.abs_weight is not None:  # γ: den = |y| + k (|x||W|ᵀ + |b|) + ε'
            den = torch.abs(y).add_(rule.den_bias)
            den.view(-1, den.shape[-1]).addmm_(x.abs().reshape(-1, x.shape[-1]), rule.abs_weight.t(), alpha=rule.k)
            if rule.scale is not None:
                den.div_(rule.scale)
            ctx.save_for_backward(x, torch.div(y, den, out=den))
        elif rule.eps is not None:  # ε: y / (y + ε sign y) = |y| / (|y| + ε)
            ay = y.abs()
            den = ay + rule.eps
            if rule.scale is not None:
                den.div_(rule.scale)
            ctx.save_for_backward(torch.div(ay, den, out=ay))
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        if ctx.done:
            raise RuntimeError("LRP rules: this graph's backward ran already (it reuses its buffers); "
                               "run the forward again")
        ctx.done = True
        rule = ctx.rule
        if rule.abs_weight is not None:
            x, q = ctx.saved_tensors
            g2 = g.reshape(-1, g.shape[-1])
            live = g2.any(1)  # rows with relevance (a ViT's last block: the class token only)
            n_live = int(live.sum())
            if 2 * n_live <= len(live):  # the same values from the live rows alone
                idx = live.nonzero().squeeze(1)
                gl, xl = g2.index_select(0, idx), x.reshape(-1, x.shape[-1]).index_select(0, idx)
                gq = q.view(-1, q.shape[-1]).index_select(0, idx).mul_(gl)
                gxl = torch.matmul(torch.copysign(gq, gl), rule.weight)
                gxl.addcmul_(xl.sign(), torch.matmul(gq, rule.abs_weight), value=rule.k)
                gx = gxl.new_zeros(len(live), x.shape[-1]).index_copy_(0, idx, gxl)
                return gx.view(x.shape), None
            gq = q.mul_(g)  # g y / den
            gx = torch.matmul(torch.copysign(gq, g), rule.weight)  # g |y| / den
            return gx.addcmul_(x.sign(), torch.matmul(gq, rule.abs_weight), value=rule.k), None
        if rule.eps is not None:
            (p,) = ctx.saved_tensors
            g = p.mul_(g)
        elif rule.scale is not None:
            g = g * rule.scale
        return torch.matmul(g, rule.weight), None


def gamma_rule(layer: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, gamma: float, eps: float,
               abs_weight: torch.Tensor | None = None, abs_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Generalised γ-rule for a linear or convolutional ``layer(x, weight, bias)``.

    Positive outputs take ``z⁺ = z + γ (x⁺w⁺ + x⁻w⁻ + b⁺)``, negative ones
    ``z⁻ = z + γ (x⁺w⁻ + x⁻w⁺ + b⁻)``, and the backward is ``g ⊙ y / z`` through ``z``. Since the
    same-sign contributions are ``x⁺w⁺ + x⁻w⁻ = (xw + |x||w|) / 2`` and ``b^± − b/2 = ±|b|/2``,
    ``z = (1 + γ/2) y + (γ/2) sign(y) (|x||w| + |b|)`` (``|z| ≥ |y|``, same sign), so the whole
    rule is the forward ``y`` plus one call ``a = layer(|x|, k|w|, k|b| + ε')`` with
    ``k = γ / (2 + γ)``, ``ε' = ε / (1 + γ/2)``: with ``den = |y| + a``, the gradient is that of
    ``(|y| / den) y + (y / den) a`` (factors constant). Two layer calls forward, two backward,
    instead of three and three. ``abs_weight`` / ``abs_bias`` are ``k|w|`` and ``k|b| + ε'``
    when the caller has them already.
    """
    y = layer(x, weight, bias)
    if abs_weight is None:
        with torch.no_grad():
            k, eps_ = gamma / (2 + gamma), max(eps, torch.finfo(y.dtype).tiny) / (1 + gamma / 2)
            abs_weight = weight.detach().abs() * k
            abs_bias = (torch.full((weight.shape[0],), eps_, dtype=y.dtype, device=y.device)
                        if bias is None else bias.detach().abs() * k + eps_)
    a = layer(x.abs(), abs_weight, abs_bias)
    with torch.no_grad():
        ay = y.abs()
        den = a + ay
        p, q = ay.div_(den), torch.div(y, den)
    return keep_value(p * y + q * a, y)


class AbsWeights:
    """``|W|`` of each weight, kept across :func:`lrp_rules` blocks while the weight is alive and
    unchanged (same tensor, storage and version counter: any in-place update, e.g. an optimiser
    step or ``load_state_dict``, makes it recompute). Held by the explainer, never by the model;
    one ``|W|`` per weight of the models it explained (a ViT-B/16: 344 MB in float32). Writes
    through ``.data`` bypass the version counter: call :meth:`clear` after them."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        sig = (w._version, w.data_ptr(), w.dtype, w.device, tuple(w.shape))
        hit = self._entries.get(id(w))
        if hit is not None and hit[0]() is w and hit[1] == sig:
            return hit[2]
        with torch.no_grad():
            a = w.detach().abs()
        entries, key = self._entries, id(w)
        self._entries[key] = (weakref.ref(w, lambda _: entries.pop(key, None)), sig, a)
        return a

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _linear(m: nn.Linear, rule: str, gamma: float, eps: float, abs_of: Callable | None = None) -> Callable:
    prepared: list[_AffineRule] = []  # built at the first call inside the block

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not prepared:
            prepared.append(_AffineRule(m.weight, m.bias, rule, gamma, eps, abs_of=abs_of))
        return prepared[0](x)
    return forward


def _is_patchify(m: nn.Conv2d) -> bool:
    """A convolution over non-overlapping patches (a ViT's patch embedding): a linear layer on
    each patch."""
    return (tuple(m.kernel_size) == tuple(m.stride) and m.padding in ((0, 0), "valid")
            and tuple(m.dilation) == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def _conv(m: nn.Conv2d, rule: str, gamma: float, eps: float, abs_of: Callable | None = None) -> Callable:
    prepared: list = []  # built at the first call inside the block

    def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return m._conv_forward(x, w, b)

    def patchify(x: torch.Tensor) -> torch.Tensor:  # the same values as the convolution, as one linear rule
        if not prepared:
            flat_abs = None if abs_of is None else (lambda w: abs_of(m.weight).flatten(1))
            prepared.append(_AffineRule(m.weight.flatten(1), m.bias, rule, gamma, eps, abs_of=flat_abs))
        (kh, kw), (n, c, h, w) = m.kernel_size, x.shape
        gh, gw = h // kh, w // kw
        patches = x[:, :, : gh * kh, : gw * kw].reshape(n, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5)
        out = prepared[0](patches.reshape(n, gh * gw, c * kh * kw))
        return out.transpose(1, 2).unflatten(2, (gh, gw))

    def forward(x: torch.Tensor) -> torch.Tensor:
        if rule == "gamma" and gamma > 0:
            if _is_patchify(m) and x.ndim == 4:  # (the ε-rule keeps the convolution's own y: its
                return patchify(x)  # factor y / (y + ε) is as sensitive to y's rounding as ε is small)
            if m.groups != 1:
                raise HarnessError("the γ-rule supports ungrouped convolutions only; use rule=epsilon")
            if not prepared:
                with torch.no_grad():
                    w, k = m.weight.detach(), gamma / (2 + gamma)
                    eps_ = max(eps, torch.finfo(w.dtype).tiny) / (1 + gamma / 2)
                    prepared.extend([w.abs() * k, torch.full((w.shape[0],), eps_, dtype=w.dtype, device=w.device)
                                     if m.bias is None else m.bias.detach().abs() * k + eps_])
            return gamma_rule(conv, x, m.weight, m.bias, gamma, eps, *prepared)
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


def _attention(m: nn.Module, mode: str, rule: str, gamma: float, eps: float,
               abs_of: Callable | None = None) -> Callable:
    """timm ``Attention.forward`` with AttnLRP's or CP-LRP's relevance flow (``m.qkv``'s rule
    included: the caller leaves ``m.qkv`` itself unpatched).

    CP-LRP computes the attention probabilities without gradient (they are constants), so the
    backward is one matmul, and only the value rows of ``qkv`` get a rule (the query and key
    rows are a plain no-grad forward). AttnLRP, fused (``scaled_dot_product_attention``, as timm
    runs it by default): its softmax rule is the plain softmax gradient, so its two uniform
    matmul rules come down to scaling the gradients of ``v`` by 1/2 and of ``q`` and ``k`` by 1/4
    (half at ``attn @ v``, half again at ``q @ kᵀ``), folded here into the backward weights of
    ``qkv``. The explicit path (when ``fused_attn`` is off) applies the same rules op by op; a
    test checks both agree.
    """
    from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

    prepared: dict[str, _AffineRule] = {}  # built at the first call inside the block
    plain = eps == 0 and (rule == "epsilon" or gamma == 0)  # LRP-0: qkv keeps its plain gradient

    def qkv_rule(x: torch.Tensor, fused: bool) -> torch.Tensor:
        if plain and (mode == "cp" or not fused):
            return m.qkv(x)
        key = f"{mode}-{fused}"
        if key not in prepared:
            rows, scale = slice(None), None
            if mode == "cp":
                rows = slice(2 * m.attn_dim, None)
            elif fused:
                scale = torch.full((3 * m.attn_dim,), 0.25)
                scale[2 * m.attn_dim :] = 0.5
            prepared[key] = _AffineRule(m.qkv.weight, m.qkv.bias, rule, gamma, eps, rows, scale, abs_of)
        return prepared[key](x)

    def forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        if mode == "cp":  # constant attention: only ``attn @ v`` needs a backward
            w, bias = m.qkv.weight, m.qkv.bias
            qk_rows = slice(None, 2 * m.attn_dim)
            with torch.no_grad():
                qk = F.linear(x, w[qk_rows], None if bias is None else bias[qk_rows])
                q, k = qk.reshape(b, n, 2, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
                q, k = m.q_norm(q), m.k_norm(k)
                logits = (q * m.scale) @ k.transpose(-2, -1)
                attn = maybe_add_mask(logits, resolve_self_attn_mask(n, logits, attn_mask, is_causal)).softmax(-1)
            if plain:
                v = F.linear(x, w[2 * m.attn_dim :], None if bias is None else bias[2 * m.attn_dim :])
            else:
                v = qkv_rule(x, False)
            out = m.attn_drop(attn) @ v.reshape(b, n, m.num_heads, m.head_dim).transpose(1, 2)
        else:
            fused = bool(m.fused_attn)
            qkv = qkv_rule(x, fused).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = m.q_norm(q), m.k_norm(k)
            if fused:  # gradient scales 1/4, 1/4, 1/2 are in qkv's backward weights
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
              gamma_linear: float = 0.05, gamma_conv: float = 0.25,
              abs_weights: AbsWeights | None = None) -> Iterator[nn.Module]:
    """Within the block, ``net``'s backward pass propagates LRP relevance (see the module doc).

    The γ-rule needs ``|W|`` of every affine layer: computed once per block, or taken from
    ``abs_weights`` (kept across blocks) when given."""
    if mode not in MODES:
        raise HarnessError(f"xai.mode={mode!r} is not valid; valid: {', '.join(MODES)}")
    if rule not in RULES:
        raise HarnessError(f"xai.rule={rule!r} is not valid; valid: {', '.join(RULES)}")
    from timm.layers import Attention

    patched: list[nn.Module] = []
    in_attention: set[int] = set()  # qkv layers, whose rule the attention patch applies itself
    try:
        for m in net.modules():
            if "forward" in vars(m):
                raise HarnessError(f"{type(m).__name__} already has a patched forward; refusing to stack LRP rules")
            if type(m) is Attention:
                fwd = _attention(m, mode, rule, gamma_linear, epsilon, abs_weights)
                in_attention.add(id(m.qkv))
            elif id(m) in in_attention:
                continue
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                gamma = gamma_linear if isinstance(m, nn.Linear) else gamma_conv
                if (rule == "epsilon" or gamma == 0) and epsilon == 0:
                    continue  # LRP-0 of an affine layer is its plain gradient: nothing to patch
                fwd = (_linear if isinstance(m, nn.Linear) else _conv)(m, rule, gamma, epsilon, abs_weights)
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
    patches_scoped = True  # tests/test_transformer_lrp.py: nothing left behind, errors included
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
        self._abs_weights = AbsWeights()  # |W| of the γ-rule, across calls (see AbsWeights)

    def unsupported(self, model: nn.Module) -> str | None:
        try:
            _check_supported(network(model), self.mode)
        except HarnessError as e:
            return str(e)
        return None

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        net = network(model)
        _check_supported(net, self.mode)
        x = x.detach().requires_grad_(True)
        with lrp_rules(net, self.mode, self.rule, self.epsilon, self.gamma_linear, self.gamma_conv,
                       self._abs_weights), \
                torch.enable_grad():
            out = model(x).gather(1, targets[:, None]).sum()
            (grad,) = torch.autograd.grad(out, x)
        ref = fill_like(model, x, "model_mean", "xai.baseline") if hasattr(model, "mean") else torch.zeros_like(x)
        return ((x.detach() - ref) * grad).sum(1)

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        return ModelCost(backward=1)
