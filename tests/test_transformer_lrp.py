"""AttnLRP / CP-LRP on timm ViTs: each rule against its formula, conservation on a whole model,
forward values untouched, and nothing left behind."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.models.cifar_resnet import CifarResNet
from harness.models.classifier import Classifier
from harness.types import HarnessError
from harness.xai.gradcam import GradCAM
from harness.xai.integrated_gradients import IntegratedGradients
from harness.xai.transformer_lrp import TransformerLRP, gamma_rule, lrp_rules, uniform_matmul


def relevance(inputs, out, r_out):
    """``x ⊙ g`` for each input, with ``g`` the (modified) gradient for output relevance ``r_out``."""
    grads = torch.autograd.grad(out, inputs, grad_outputs=r_out / out)
    return [x * g for x, g in zip(inputs, grads)]


def test_uniform_matmul_splits_relevance_in_half():
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    out = uniform_matmul(a, b)
    torch.testing.assert_close(out, a @ b)
    r_out = torch.rand(3, 5, dtype=torch.float64)
    ra, rb = relevance([a, b], out, r_out)
    torch.testing.assert_close(ra.sum(), 0.5 * r_out.sum())
    torch.testing.assert_close(rb.sum(), 0.5 * r_out.sum())


def test_softmax_gradient_is_the_attnlrp_softmax_rule():
    """Achtibat et al., Prop. 3.1: R_in = x (R_out − s Σ R_out)."""
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    s = x.softmax(-1)
    r_out = torch.rand(2, 6, dtype=torch.float64)
    (r_in,) = relevance([x], s, r_out)
    torch.testing.assert_close(r_in, x * (r_out - s * r_out.sum(-1, keepdim=True)))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gamma_rule_conserves_without_bias_and_boosts_positive_contributions(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x, w = F.linear, torch.randn(4, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    else:
        layer = lambda x, w, b: F.conv2d(x, w, b, padding=1)  # noqa: E731
        x, w = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    x.requires_grad_(True)
    out = gamma_rule(layer, x, w, None, gamma=0.5, eps=0.0)
    torch.testing.assert_close(out, layer(x, w, None))
    r_out = torch.rand_like(out)
    (r_in,) = relevance([x], out, r_out)
    torch.testing.assert_close(r_in.sum(), r_out.sum())
    if kind == "linear":  # one output by hand: contributions x_i w_i, those of z's sign × (1 + γ)
        c = (x[0] * w[0]).detach()
        c = c + 0.5 * (c.clamp(min=0) if out[0, 0] >= 0 else c.clamp(max=0))
        torch.testing.assert_close(r_in[0].detach(), (c / c.sum() * r_out[0, 0]) + _others(x, w, out, r_out))


def _others(x, w, out, r_out):
    """Relevance image 0 receives from outputs 1.. (so output 0 can be checked by hand)."""
    x0 = x[:1].detach().requires_grad_(True)
    o = gamma_rule(F.linear, x0, w, None, gamma=0.5, eps=0.0)
    mask = torch.ones_like(o)
    mask[0, 0] = 0
    (g,) = torch.autograd.grad(o, x0, grad_outputs=mask * r_out[:1] / o)
    return (x0 * g)[0].detach()


def tiny_vit(dtype=torch.float32, zero_bias=False):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32,
                            patch_size=8, embed_dim=32, depth=2, num_heads=2).to(dtype).eval()
    with torch.no_grad():
        net.cls_token.normal_()
        net.pos_embed.normal_(std=0.5)
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.zero_() if zero_bias else p.normal_(std=0.1)
    return Classifier(net, input_size=32).to(dtype).eval()


@pytest.mark.parametrize("mode,rule,tol", [("cp", "epsilon", 1e-10), ("cp", "gamma", 1e-10),
                                           ("attnlrp", "epsilon", 0.02), ("attnlrp", "gamma", 0.02)])
def test_conservation_on_a_whole_vit(mode, rule, tol):
    """Zero biases, ε = 0: CP-LRP's input + class-token + position-embedding relevance is the
    logit exactly; AttnLRP loses only its softmax rule's bias term (measured < 1 % here)."""
    model = tiny_vit(torch.float64, zero_bias=True)
    net = model.net
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2])
    with lrp_rules(net, mode, rule, epsilon=0.0, gamma_linear=0.1, gamma_conv=0.25):
        logit = model(x).gather(1, t[:, None]).sum()
        gx, gc, gp = torch.autograd.grad(logit, [x, net.cls_token, net.pos_embed])
    total = ((x - model.mean) * gx).sum() + (net.cls_token * gc).sum() + (net.pos_embed * gp).sum()
    assert total.item() == pytest.approx(logit.item(), rel=tol)


def test_forward_values_unchanged_and_patches_removed_on_error():
    model = tiny_vit(zero_bias=False)
    x = torch.rand(2, 3, 32, 32)
    ref = model(x)
    with pytest.raises(RuntimeError, match="boom"):
        with lrp_rules(model.net, "attnlrp", "gamma"):
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
            raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_other_methods_after_attnlrp_are_unchanged():
    model = tiny_vit()
    x, t = torch.rand(2, 3, 32, 32), torch.tensor([1, 3])
    ig, cam = IntegratedGradients(n_steps=8), GradCAM()
    before = ig(model, x, t), cam(model, x, t)
    lrp = TransformerLRP()(model, x, t)
    assert np.isfinite(lrp).all() and np.abs(lrp).sum() > 0
    np.testing.assert_array_equal(ig(model, x, t), before[0])
    np.testing.assert_array_equal(cam(model, x, t), before[1])


def test_attnlrp_differs_from_cp_and_from_input_x_gradient():
    model = tiny_vit()
    x, t = torch.rand(2, 3, 32, 32), torch.tensor([1, 3])
    a = TransformerLRP("attnlrp", "epsilon")(model, x, t)
    c = TransformerLRP("cp", "epsilon")(model, x, t)
    from harness.xai.gradients import InputXGradient

    ixg = InputXGradient()(model, x, t)
    assert not np.allclose(a, c) and not np.allclose(a, ixg, rtol=1e-3)


def test_clear_errors():
    cnn = Classifier(CifarResNet(depth=8, num_classes=4), input_size=32).eval()
    with pytest.raises(HarnessError, match="xai=lrp"):
        TransformerLRP()(cnn, torch.rand(1, 3, 32, 32), [0])
    with pytest.raises(HarnessError, match="valid: attnlrp, cp"):
        TransformerLRP(mode="lxt")
    with pytest.raises(HarnessError, match="valid: epsilon, gamma"):
        TransformerLRP(rule="zplus")
    model = tiny_vit()
    model.net.blocks[0].attn.gate = nn.Linear(32, 32)
    with pytest.raises(HarnessError, match="ungated"):
        TransformerLRP()(model, torch.rand(1, 3, 32, 32), [0])


@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
def test_fused_attention_path_equals_the_rule_by_rule_path(mode):
    """With fused attention the rules become gradient scales on q, k, v; they must give the
    relevance of the explicit softmax and uniform-matmul rules."""
    model = tiny_vit()
    x, t = torch.rand(2, 3, 32, 32), torch.tensor([1, 3])
    maps = {}
    for fused in (True, False):
        for blk in model.net.blocks:
            blk.attn.fused_attn = fused
        maps[fused] = TransformerLRP(mode, "epsilon")(model, x, t)
    np.testing.assert_allclose(maps[True], maps[False], rtol=1e-4, atol=1e-6 * np.abs(maps[False]).max())


# --- The optimised rules against a straightforward, un-optimised LRP written out here -----------
# Each rule below is the textbook formula, computed the slow way (every contribution x_i w_ij of
# every affine layer materialised; attention op by op; no fused kernels, no cached weights). Its
# maps were checked once against the implementation before the γ-rule was rewritten (commit
# 26ec25d: ≤ 8e-16 of the map's max in float64), so this test pins the current maps to the old.


def _stab(z, eps):
    return z.abs().add(max(eps, torch.finfo(z.dtype).tiny)).copysign(z)


def _with_value(surrogate, exact):
    return surrogate + (exact - surrogate).detach()


def _reference_affine(x, w, b, gamma, eps):
    """ε- or γ-rule of ``x @ w.T + b`` from its contributions ``c_ij = x_i w_ji``: outputs of
    each sign boost the contributions (and bias) of that sign by ``γ``; the backward is
    ``g y / z`` through ``z``."""
    c = x[..., None, :] * w  # [..., out, in]
    y = c.sum(-1) + b
    if gamma > 0:
        zp = (c + gamma * c.clamp(min=0)).sum(-1) + b + gamma * b.clamp(min=0)
        zn = (c + gamma * c.clamp(max=0)).sum(-1) + b + gamma * b.clamp(max=0)
        z = torch.where(y >= 0, zp, zn)
    else:
        z = y
    return _with_value(z * (y / _stab(z, eps)).detach(), y.detach())


def reference_maps(model, x, t, mode, rule, epsilon=1e-6, gamma_linear=0.05, gamma_conv=0.25):
    from timm.layers import Attention

    net = model.net
    g_lin = gamma_linear if rule == "gamma" else 0.0
    g_conv = gamma_conv if rule == "gamma" else 0.0

    def linear(m):
        def forward(h):
            b = m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=h.dtype)
            return _reference_affine(h, m.weight, b, g_lin, epsilon)
        return forward

    def patch_conv(m):  # non-overlapping patches: a linear layer on each unfolded patch
        def forward(h):
            n, _, hh, ww = h.shape
            cols = F.unfold(h, m.kernel_size, stride=m.stride).transpose(1, 2)  # [N, L, C*k*k]
            b = m.bias if m.bias is not None else torch.zeros(m.out_channels, dtype=h.dtype)
            out = _reference_affine(cols, m.weight.flatten(1), b, g_conv, epsilon)
            return out.transpose(1, 2).reshape(n, m.out_channels, hh // m.stride[0], ww // m.stride[1])
        return forward

    def layer_norm(m):  # identity rule: the standard deviation held constant
        def forward(h):
            mu = h.mean(-1, keepdim=True)
            std = (h.var(-1, unbiased=False, keepdim=True) + m.eps).sqrt().detach()
            return _with_value((h - mu) / std * m.weight + m.bias, F.layer_norm(h, m.normalized_shape, m.weight,
                                                                                  m.bias, m.eps).detach())
        return forward

    def gelu(m):  # identity rule: R_in = R_out
        def forward(h):
            y = F.gelu(h)
            return h * torch.where(h == 0, torch.zeros_like(h), y / h).detach()
        return forward

    def uniform(a, b):  # half the relevance to each factor
        return 0.5 * (a @ b.detach()) + 0.5 * (a.detach() @ b)

    def attention(m):
        def forward(h, attn_mask=None, is_causal=False):
            bsz, n, _ = h.shape
            q, k, v = m.qkv(h).reshape(bsz, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            if mode == "cp":  # attention probabilities are constants
                attn = ((q * m.scale) @ k.transpose(-2, -1)).softmax(-1).detach()
                out = attn @ v
            else:
                out = uniform(uniform(q * m.scale, k.transpose(-2, -1)).softmax(-1), v)
            return m.proj(out.transpose(1, 2).reshape(bsz, n, m.attn_dim))
        return forward

    patched = []
    try:
        for m in net.modules():
            if type(m) is Attention:
                m.forward = attention(m)
            elif isinstance(m, nn.Linear):
                m.forward = linear(m)
            elif isinstance(m, nn.Conv2d):
                assert m.kernel_size == m.stride and m.padding == (0, 0)
                m.forward = patch_conv(m)
            elif isinstance(m, nn.LayerNorm):
                m.forward = layer_norm(m)
            elif isinstance(m, nn.GELU):
                m.forward = gelu(m)
            else:
                continue
            patched.append(m)
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xg).gather(1, t[:, None]).sum(), xg)
    finally:
        for m in patched:
            del m.forward
    return ((x - model.mean) * grad).sum(1)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mode", ["attnlrp", "cp"])
@pytest.mark.parametrize("rule,eps", [("gamma", 1e-6), ("gamma", 0.1), ("epsilon", 1e-6), ("epsilon", 0.0)])
def test_maps_equal_the_straightforward_rules(mode, rule, eps, fused):
    """float64, tolerance 1e-6 of the map's largest |value| (measured: ~1e-15)."""
    model = tiny_vit(torch.float64, zero_bias=False)
    for blk in model.net.blocks:
        blk.attn.fused_attn = fused
    torch.manual_seed(1)
    x, t = torch.rand(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 3])
    kw = dict(epsilon=eps, gamma_linear=0.05, gamma_conv=0.25)
    ref = reference_maps(model, x, t, mode, rule, **kw)
    ours = TransformerLRP(mode, rule, **kw).explain(model, x, t)
    assert not any("forward" in vars(m) for m in model.modules())
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= 1e-6, err


def test_backward_twice_is_refused():
    """The γ-rule's backward reuses its saved buffers, so a retained graph must not run twice."""
    model = tiny_vit(torch.float64)
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    with lrp_rules(model.net, "attnlrp", "gamma"):
        out = model(x)[0, 0]
    torch.autograd.grad(out, x, retain_graph=True)
    with pytest.raises(RuntimeError, match="ran already"):
        torch.autograd.grad(out, x)


def test_kept_abs_weights_follow_in_place_weight_updates():
    """|W| kept across calls is recomputed when a weight changes in place (version counter)."""
    model = tiny_vit(torch.float64)
    x, t = torch.rand(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 3])
    lrp = TransformerLRP("attnlrp", "gamma")
    before = lrp.explain(model, x, t)
    assert len(lrp._abs_weights) > 0
    with torch.no_grad():
        model.net.blocks[0].mlp.fc1.weight.mul_(-1.5)
    after = lrp.explain(model, x, t)
    torch.testing.assert_close(after, TransformerLRP("attnlrp", "gamma").explain(model, x, t))
    assert not torch.allclose(before, after)
    assert not any("forward" in vars(m) for m in model.modules())
