"""LRP for CNNs (xai=lrp): conservation through folded BatchNorm and residual sums, the exact
LRP-ε = input × gradient identity, exact restoration of the model, refusals."""

import contextlib

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

import harness.xai.lrp as lrp_mod
from conftest import make_cfg
from harness.models.cifar_resnet import CifarResNet
from harness.models.classifier import Classifier
from harness.types import HarnessError
from harness.xai.base import ModelCost
from harness.xai.lrp import LRP, fold_batchnorm

COMPOSITES = ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon")
TINY = {"epsilon": 1e-12, "stabilizer": 1e-12}


def cifar_resnet(dtype=torch.float64, zero_bias=True):
    """Depth-8 CifarResNet, random weights, BatchNorm in eval mode with non-trivial running stats
    and scales. With ``zero_bias`` each BatchNorm's shift is chosen so that its folded bias is
    zero (it stays a non-trivial per-channel scaling) and the head bias is zero: no bias anywhere,
    so LRP must conserve the target logit exactly."""
    torch.manual_seed(0)
    net = CifarResNet(depth=8, num_classes=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.3)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(m.running_mean * m.weight / (m.running_var + m.eps).sqrt() if zero_bias
                             else torch.randn(c, generator=g) * 0.1)
        if zero_bias:
            net.linear.bias.zero_()
    return Classifier(net, input_size=32).eval().to(dtype)


def images(n=3, size=32, dtype=torch.float64):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=dtype)


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def snapshot(model):
    """Everything LRP may touch: module objects by name, parameter objects, state_dict values,
    instance-level forwards."""
    return {
        "modules": [(n, id(m)) for n, m in model.named_modules()],
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "forwards": [n for n, m in model.named_modules() if "forward" in vars(m)],
    }


def assert_same(model, snap):
    now = snapshot(model)
    assert now["modules"] == snap["modules"]
    assert now["params"] == snap["params"]
    assert now["forwards"] == snap["forwards"] == []
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k


def target_logits(model, x, t):
    with torch.no_grad():
        return model(x).gather(1, t[:, None])[:, 0]


@pytest.mark.parametrize("composite", COMPOSITES)
def test_conservation_through_folded_batchnorm_and_residual_sums(composite):
    """No biases, tiny ε: the input relevance sums to the target logit (float64; measured
    relative error <= 6e-7 for all three composites, asserted < 1e-5). Unfolded or wrongly folded
    BatchNorms would change the logit the relevance sums to."""
    model, x, t = cifar_resnet(), images(), torch.tensor([0, 3, 1])
    rel = LRP(composite, **TINY).explain(model, x, t)
    assert rel.shape == x.shape
    logit = target_logits(model, x, t)
    np.testing.assert_allclose(rel.sum((1, 2, 3)).numpy(), logit.numpy(), rtol=1e-5, atol=0)


def test_lrp_epsilon_is_input_times_gradient_only_with_residual_rewrite(monkeypatch):
    """In a ReLU net without biases LRP-ε (ε → 0) equals input × gradient at the network input:
    every rule, including the residual Sum's and the average pool's, is then the gradient times the
    input. Plain autograd through ``shortcut + branch`` breaks this (it hands both summands the full
    relevance), so the identity proves the residual handling; measured max difference ~5e-12 (max |map| ~1e-3)."""
    model, x, t = cifar_resnet(), images(), torch.tensor([0, 3, 1])
    z = ((x - model.mean) / model.std).requires_grad_(True)
    (grad,) = torch.autograd.grad(model.net(z).gather(1, t[:, None]).sum(), z)
    ixg = (z * grad).detach()
    rel = LRP("epsilon", **TINY).explain(model, x, t)
    np.testing.assert_allclose(rel.numpy(), ixg.numpy(), rtol=0, atol=1e-7 * float(ixg.abs().max()))

    monkeypatch.setattr(lrp_mod, "canonical_blocks", lambda net: contextlib.nullcontext([]))
    plain = LRP("epsilon", **TINY).explain(model, x, t)
    assert float((plain - ixg).abs().max()) > 1e-3 * float(ixg.abs().max())


def test_fold_batchnorm_keeps_the_function_and_restores_everything():
    model = cifar_resnet(dtype=torch.float32, zero_bias=False)
    net, x = model.net, images(4, dtype=torch.float32)
    before, snap = model(x).detach(), snapshot(model)
    with fold_batchnorm(net, ((x - model.mean) / model.std)[:1]) as pairs:
        assert len(pairs) == 7 and ("conv1", "bn1") in pairs
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        assert net.conv1.bias is not None
        torch.testing.assert_close(model(x).detach(), before, rtol=1e-5, atol=1e-5)
    assert_same(model, snap)
    assert torch.equal(model(x).detach(), before)

    with pytest.raises(RuntimeError, match="boom"):
        with fold_batchnorm(net, ((x - model.mean) / model.std)[:1]):
            raise RuntimeError("boom")
    assert_same(model, snap)
    assert net.conv1.bias is None and torch.equal(model(x).detach(), before)


def test_no_hooks_or_patches_left_and_model_unchanged():
    model, x, t = cifar_resnet(dtype=torch.float32, zero_bias=False), images(3, dtype=torch.float32), \
        torch.tensor([0, 3, 1])
    before, snap, n_hooks = model(x).detach(), snapshot(model), hooks(model)
    a = LRP("epsilon_gamma_box")(model, x, t)
    assert a.shape == (3, 32, 32) and np.isfinite(a).all() and np.abs(a).sum() > 0
    assert hooks(model) == n_hooks
    assert_same(model, snap)
    assert torch.equal(model(x).detach(), before)

    with pytest.raises((RuntimeError, IndexError)):  # fails mid-pass (bad target): still restored
        LRP()(model, x, [0, 3, 99])
    assert hooks(model) == n_hooks
    assert_same(model, snap)
    assert torch.equal(model(x).detach(), before)


def test_vit_is_refused_with_a_pointer_to_transformer_lrp():
    import timm

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32,
                            patch_size=8, embed_dim=32, depth=1, num_heads=2)
    model = Classifier(net, input_size=32).eval()
    with pytest.raises(HarnessError, match="attnlrp.*cplrp"):
        LRP()(model, torch.rand(1, 3, 32, 32), [0])
    assert hooks(model) == 0


def test_unsupported_cnns_are_refused_not_silently_wrong():
    class Block(nn.Module):  # an unknown residual block: its `+` has no rule
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    model = Classifier(nn.Sequential(Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), input_size=8).eval()
    with pytest.raises(HarnessError, match="Block"):
        LRP()(model, torch.rand(1, 3, 8, 8), [0])
    pre_act = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten())
    with pytest.raises(HarnessError, match="BatchNorm"):
        LRP()(Classifier(pre_act, input_size=8).eval(), torch.rand(1, 3, 8, 8), [0])


def test_bad_composite_names_the_valid_ones_and_config_builds():
    with pytest.raises(HarnessError, match="epsilon_plus_flat, epsilon_gamma_box"):
        LRP("alpha_beta")
    ex = instantiate(make_cfg(["xai=lrp", "xai.composite=epsilon_gamma_box"]).xai)
    assert isinstance(ex, LRP) and ex.composite == "epsilon_gamma_box" and ex.needs_gradients
    assert ex.model_cost((224, 224)) == ModelCost(backward=1)


def test_zbox_bounds_are_the_pixel_range_in_network_space():
    """One 1×1 convolution into an average pool: the z^B rule splits each pixel's relevance over
    the channels in proportion to ``z w - l w⁺ - h w⁻`` with ``l, h = (0|1 - mean) / std``."""
    conv = nn.Conv2d(3, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.7, -0.4, 0.2]).view(1, 3, 1, 1))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = Classifier(nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten()), input_size=4,
                       mean=mean, std=std).eval().double()
    x = images(1, 4)
    rel = LRP("epsilon_gamma_box", **TINY).explain(model, x, torch.tensor([0]))
    m, s = model.mean, model.std  # the float32 constants, as the model holds them
    z, w = (x - m) / s, conv.weight.detach()
    low, high = (0 - m) / s, (1 - m) / s
    share = z * w - low * w.clamp(min=0) - high * w.clamp(max=0)
    y = (z * w).sum(1, keepdim=True)
    expected = share / share.sum(1, keepdim=True) * y / 16  # pixel relevance y_p / HW (pool)
    np.testing.assert_allclose(rel.numpy(), expected.numpy(), rtol=1e-8, atol=1e-12)


def unit_scale(net, x):
    """Rescale each layer (in forward order) so its output on ``x`` has unit std: a random deep
    net without BatchNorm otherwise shrinks its activations to ~1e-10 (biases stay zero)."""
    for m in [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]:
        store = {}
        h = m.register_forward_hook(lambda _m, _i, out: store.__setitem__("out", out))
        with torch.no_grad():
            net(x)
        h.remove()
        m.weight.data /= store["out"].std()


@pytest.mark.parametrize(("fused", "composite"), [(True, c) for c in COMPOSITES] + [(False, "epsilon_gamma_box")])
def test_mobilenet_v2_runs_and_conserves(fused, composite):
    """torchvision's MobileNetV2 as builders.torchvision_model builds it; with ``fused`` the
    quantization-ready model of model=mobilenet_v2_imagenet (BN fused into the convs, ConvReLU2d,
    residual via skip_add FloatFunctional), without it the plain one (BatchNorm folded here).
    Random weights, no biases, 64 px, float32: relevance sums to the target logit (measured
    relative error 2e-5 to 4e-5 for all composites, both builds; asserted < 1e-3)."""
    from harness.models.builders import torchvision_model

    torch.manual_seed(0)
    model = torchvision_model("mobilenet_v2", fused=fused, num_classes=10, input_size=64, resize=None)
    x, t = images(2, 64, torch.float32), torch.tensor([1, 7])
    unit_scale(model.net, (x - model.mean) / model.std)
    assert not any(p.abs().sum() for n, p in model.named_parameters() if n.endswith("bias"))
    before, snap, n_hooks = model(x).detach(), snapshot(model), hooks(model)
    rel = LRP(composite).explain(model, x, t)
    logit = target_logits(model, x, t)
    np.testing.assert_allclose(rel.sum((1, 2, 3)).numpy(), logit.numpy(), rtol=1e-3, atol=0)
    assert hooks(model) == n_hooks
    assert_same(model, snap)
    assert torch.equal(model(x).detach(), before)


@pytest.mark.parametrize(("name", "fused"), [("resnet18", False), ("resnet50", True)])
def test_torchvision_resnet_conserves(name, fused):
    """torchvision ResNet BasicBlock (plain: BatchNorm folded here, ``out += identity``) and
    Bottleneck (quantization-ready: fused, ``add_relu`` FloatFunctional); head bias zeroed
    (measured relative error <= 5e-5 for all composites, both builds; asserted < 1e-3)."""
    from harness.models.builders import torchvision_model

    torch.manual_seed(0)
    model = torchvision_model(name, fused=fused, num_classes=10, input_size=64, resize=None)
    with torch.no_grad():
        model.net.fc.bias.zero_()
    x, t = images(2, 64, torch.float32), torch.tensor([1, 7])
    snap = snapshot(model)
    rel = LRP("epsilon_plus_flat").explain(model, x, t)
    np.testing.assert_allclose(rel.sum((1, 2, 3)).numpy(), target_logits(model, x, t).numpy(), rtol=1e-3)
    assert_same(model, snap)
