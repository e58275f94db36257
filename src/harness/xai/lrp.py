"""Layer-wise relevance propagation (LRP) for CNNs, with zennit's rules and composites.

The target logit is propagated back layer by layer, each layer sharing the relevance of its
outputs among its inputs by an LRP rule; the map is the relevance of the *network* input
``z = (x - mean) / std`` (the Classifier's normalisation is a per-pixel bijection, so a pixel
keeps its channel's relevance), summed over colour channels. With zero biases the input
relevance sums to the target logit (conservation); biases absorb their share.

Composites (which rule goes where), after Kohlbrenner et al. 2020:

==================  =========================================================================
epsilon_plus_flat   flat rule on the first layer, z⁺ on the other convolutions, ε on dense layers
epsilon_gamma_box   z^B (box) rule on the first convolution, bounded by the pixel range [0, 1]
                    mapped through the normalisation, ``(0 - mean) / std`` … ``(1 - mean) / std``
                    per channel; γ on the other convolutions; ε on dense layers
epsilon             ε everywhere (LRP-ε; with ε → 0 and no biases this is input × gradient)
==================  =========================================================================

Everywhere: activations pass relevance unchanged, average pools and residual sums share it in
proportion to their inputs' contributions, max pools route it to the maximum.

Before the rules are attached, the network is put in canonical form, on this model instance
only and undone on exit, errors included:

* every BatchNorm that directly follows a convolution is folded into it and replaced by an
  identity (:func:`fold_batchnorm`; zennit's own BatchNorm canonizer fails on torch >= 2.10,
  zennit issue #234);
* residual additions become a ``zennit.layer.Sum`` module over the stacked summands, so they get
  a proper rule instead of plain autograd, which would hand the full relevance to both summands;
  functional global average pools become modules (:func:`canonical_blocks`). Supported: the
  harness CifarResNet, torchvision ResNet (BasicBlock, Bottleneck) and MobileNetV2
  (InvertedResidual), plain and quantization-ready (fused) builds, and any network made of
  Sequential stacks of convolutions, BatchNorm, ReLU, pooling and linear layers. Other models
  are refused with the module that is not covered; vision transformers go to xai=attnlrp or
  xai=cplrp.

References:
    Bach, Binder, Montavon, Klauschen, Müller & Samek, "On Pixel-Wise Explanations for
    Non-Linear Classifier Decisions by Layer-Wise Relevance Propagation", PLoS ONE 2015.
    Montavon, Binder, Lapuschkin, Samek & Müller, "Layer-Wise Relevance Propagation: An
    Overview", in Explainable AI: Interpreting, Explaining and Visualizing Deep Learning,
    Springer LNCS 11700, 2019.
    Kohlbrenner, Bauer, Nakajima, Binder, Samek & Lapuschkin, "Towards Best Practice in
    Explaining Neural Network Decisions with LRP", IJCNN 2020.
    Anders, Neumann, Samek, Müller & Lapuschkin, "Software for Dataset-wide XAI: From Local
    Explanations to Global Insights with Zennit, CoRelAy, and ViRelAy", 2021 (arXiv:2106.13200).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from harness.types import HarnessError
from harness.xai.base import Explainer, ModelCost, is_vit, network

COMPOSITES = ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon")
VIT_HELP = "xai=lrp is LRP for CNNs; for vision transformers use xai=attnlrp or xai=cplrp"

# Leaf modules whose LRP treatment is known (a rule, a pass-through, or exact routing).
_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity, nn.Flatten,
)
# Modules that rules are attached to and that read their stored input: each may run once a pass.
_RULED: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


# ----------------------------------------------------------------------------------------------
# BatchNorm folding


def _trace(net: nn.Module, probe: torch.Tensor) -> dict[str, Any]:
    """One forward of ``probe``: the logits, call counts, the first conv/linear called, and which
    BatchNorm reads a conv's output directly (data flow, not module order)."""
    names = {m: n for n, m in net.named_modules()}
    conv_out: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, str] = {}
    calls: dict[str, int] = {}
    order: list[str] = []

    def pre(m: nn.Module, inp: tuple) -> None:
        name = names[m]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(m, nn.BatchNorm2d) and inp and isinstance(inp[0], torch.Tensor):
            hit = conv_out.get(id(inp[0]))
            if hit is not None and hit[1] is inp[0]:
                pairs[name] = hit[0]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            order.append(name)

    def post(m: nn.Module, _inp: tuple, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            conv_out[id(out)] = (names[m], out)

    handles = []
    try:
        for m in net.modules():
            handles.append(m.register_forward_pre_hook(pre))
            if isinstance(m, nn.Conv2d):
                handles.append(m.register_forward_hook(post))
        with torch.no_grad():
            logits = net(probe)
    finally:
        for h in handles:
            h.remove()
    return {"logits": logits, "pairs": pairs, "calls": calls, "first": order[0] if order else None}


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution (BatchNorm in eval mode)."""
    w = conv.weight.detach().double()
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    weight = w * scale.view(-1, *([1] * (w.ndim - 1)))
    bias = (b - mean) * scale + beta
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


@contextmanager
def fold_batchnorm(net: nn.Module, probe: torch.Tensor,
                   _trace_out: dict[str, Any] | None = None) -> Iterator[list[tuple[str, str]]]:
    """Fold every BatchNorm2d that reads a Conv2d's output directly into that convolution.

    Within the block the convolution holds new weight/bias parameters and the BatchNorm is
    replaced by ``nn.Identity`` in its parent; on exit, errors included, the original parameter
    objects and modules are put back (bit for bit, the same objects). ``probe`` is one network
    input, run once to find which convolution feeds which BatchNorm. Yields the folded
    ``(conv, batchnorm)`` names.
    """
    for name, m in net.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not isinstance(m, nn.BatchNorm2d) or m.running_mean is None:
                raise HarnessError(f"LRP folds BatchNorm2d with running statistics only; {name or 'the net'} "
                                   f"is {type(m).__name__}")
            if m.training:
                raise HarnessError("LRP folds BatchNorm with its running statistics; put the model in "
                                   "eval mode (model.eval())")
    pairs = (_trace_out or _trace(net, probe))["pairs"]
    bns = {n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    if bns - set(pairs):
        name = sorted(bns - set(pairs))[0]
        raise HarnessError(f"LRP cannot fold BatchNorm {name!r}: it does not read a convolution's output "
                           "directly (pre-activation nets are not supported)")
    convs = list(pairs.values())
    if len(set(convs)) != len(convs):
        raise HarnessError("LRP cannot fold BatchNorm: one convolution feeds several BatchNorms")
    saved_params: list[tuple[nn.Module, str, Any]] = []
    saved_mods: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for bn_name, conv_name in pairs.items():
            conv, bn = net.get_submodule(conv_name), net.get_submodule(bn_name)
            weight, bias = _folded(conv, bn)
            for key, value in (("weight", weight), ("bias", bias)):
                saved_params.append((conv, key, conv._parameters[key]))
                conv._parameters[key] = nn.Parameter(value, requires_grad=conv.weight.requires_grad)
            parent_name, _, key = bn_name.rpartition(".")
            parent = net.get_submodule(parent_name)
            saved_mods.append((parent, key, bn))
            parent._modules[key] = nn.Identity()
        yield [(c, b) for b, c in pairs.items()]
    finally:
        for parent, key, bn in reversed(saved_mods):
            parent._modules[key] = bn
        for conv, key, value in reversed(saved_params):
            conv._parameters[key] = value


# ----------------------------------------------------------------------------------------------
# Residual sums and functional pools as modules


def _sum(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return module.lrp_sum(torch.stack([a, b], dim=-1))


def _cifar_resnet_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.layer3(self.layer2(self.layer1(out)))
    return self.linear(self.lrp_pool(out).flatten(1))


def _cifar_block_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = self.relu1(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu2(_sum(self, self.shortcut(x), out))


def _tv_basic_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # torchvision BasicBlock and its quantization-ready twin (after fusion conv1 is ConvReLU2d and
    # relu an Identity; the final ReLU lives in add_relu, so it is ours here).
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.lrp_relu(_sum(self, identity, out))


def _tv_bottleneck_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # torchvision Bottleneck reuses ``relu``; the quantization-ready one has relu1/relu2 (Identity
    # after fusion) and its final ReLU in add_relu.
    relu1 = self.relu1 if hasattr(self, "relu1") else self.relu
    relu2 = self.relu2 if hasattr(self, "relu2") else self.relu
    identity = x if self.downsample is None else self.downsample(x)
    out = relu1(self.bn1(self.conv1(x)))
    out = relu2(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.lrp_relu(_sum(self, identity, out))


def _mobilenet_v2_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    quant, dequant = getattr(self, "quant", None), getattr(self, "dequant", None)
    if quant is not None:
        x = quant(x)
    x = self.features(x)
    x = self.classifier(self.lrp_pool(x).flatten(1))
    return dequant(x) if dequant is not None else x


def _inverted_residual_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _sum(self, x, self.conv(x))


def _patch_table() -> list[tuple[type[nn.Module], Callable, Callable[[nn.Module], dict[str, nn.Module]]]]:
    """(class, forward, new child modules) for the blocks whose forward is rewritten."""
    from zennit.layer import Sum

    from harness.models.cifar_resnet import BasicBlock as CifarBlock
    from harness.models.cifar_resnet import CifarResNet

    def pool(_m: nn.Module) -> dict[str, nn.Module]:
        return {"lrp_pool": nn.AdaptiveAvgPool2d(1)}

    def sum_(_m: nn.Module) -> dict[str, nn.Module]:
        return {"lrp_sum": Sum(dim=-1)}

    def sum_relu(_m: nn.Module) -> dict[str, nn.Module]:
        return {"lrp_sum": Sum(dim=-1), "lrp_relu": nn.ReLU()}

    table: list = [
        (CifarResNet, _cifar_resnet_forward, pool),
        (CifarBlock, _cifar_block_forward, sum_),
    ]
    try:
        from torchvision.models.mobilenetv2 import InvertedResidual, MobileNetV2
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return table
    return table + [
        (BasicBlock, _tv_basic_forward, sum_relu),  # also the quantization-ready subclasses
        (Bottleneck, _tv_bottleneck_forward, sum_relu),
        (MobileNetV2, _mobilenet_v2_forward, pool),
        (InvertedResidual, _inverted_residual_forward, sum_),
    ]


def _trusted_containers() -> tuple[type[nn.Module], ...]:
    """Non-Sequential modules whose own forward is fine as it is."""
    from harness.models.cifar_resnet import _PadShortcut  # slicing and zero padding: exact routing

    out: list[type[nn.Module]] = [_PadShortcut]
    try:
        from torch.ao.nn.quantized import FloatFunctional
        from torch.ao.quantization import DeQuantStub, QuantStub
        from torchvision.models.quantization.resnet import QuantizableResNet
        from torchvision.models.resnet import ResNet

        # Stubs are identities in float mode; FloatFunctional is only used by the rewritten blocks.
        out += [ResNet, QuantizableResNet, QuantStub, DeQuantStub, FloatFunctional]
    except ImportError:  # pragma: no cover
        pass
    return tuple(out)


def unsupported(net: nn.Module) -> str | None:
    """Why LRP cannot handle ``net`` (a sentence), or ``None`` when it can."""
    if is_vit(net) or any(isinstance(m, nn.MultiheadAttention) or type(m).__name__ == "Attention"
                          for m in net.modules()):
        return VIT_HELP
    patched = tuple(cls for cls, _, _ in _patch_table())
    trusted = _trusted_containers()
    for name, m in net.named_modules():
        t = type(m)
        if t in _LEAVES or t in trusted or isinstance(m, patched) or t.forward is nn.Sequential.forward:
            continue
        return (f"xai=lrp has no rule for module {name or '<net>'!r} ({t.__module__}.{t.__qualname__}); it "
                "supports Sequential CNNs of Conv2d/BatchNorm2d/ReLU/pooling/Linear and the residual blocks "
                "of the harness CifarResNet and torchvision ResNet and MobileNetV2"
                + (f". {VIT_HELP}" if "attention" in t.__name__.lower() else ""))
    return None


@contextmanager
def canonical_blocks(net: nn.Module) -> Iterator[list[str]]:
    """Rewrite the forward of the supported blocks of ``net`` (this instance only) so that
    residual additions go through a ``zennit.layer.Sum`` module and global average pools through
    an ``nn.AdaptiveAvgPool2d`` module, which zennit's composites give rules to. Yields the names
    of the rewritten modules; on exit, errors included, the instance ``forward`` attributes and
    added child modules are removed. A block whose instance is already patched is refused."""
    table = _patch_table()
    done: list[tuple[nn.Module, list[str]]] = []
    names: list[str] = []
    try:
        for name, m in list(net.named_modules()):
            for cls, forward, children in table:
                if not isinstance(m, cls):
                    continue
                if cls.__name__ == "InvertedResidual" and not m.use_res_connect:
                    break
                new = children(m)
                clash = [k for k in ("forward", *new) if k in vars(m) or k in m._modules]
                if clash:
                    raise HarnessError(f"xai=lrp: module {name!r} already has an instance {clash[0]!r} "
                                       "(patched by something else?); refusing to stack patches")
                done.append((m, list(new)))
                for key, child in new.items():
                    m.add_module(key, child)  # no parameters: nothing to move
                m.forward = types.MethodType(forward, m)
                names.append(name)
                break
        yield names
    finally:
        for m, keys in reversed(done):
            for key in keys:
                m._modules.pop(key, None)
            m.__dict__.pop("forward", None)


@contextmanager
def parameters_kept(net: nn.Module) -> Iterator[None]:
    """Put the network's own Parameter objects back when the block ends. zennit >= 1.0 (what the
    lock resolves on Python >= 3.12) restores the parameters a rule modified with
    ``load_state_dict(..., assign=True)``: the same values in *new* Parameter objects, so an
    optimiser or anything else holding the originals would no longer see the model's gradients."""
    saved = [(m, dict(m._parameters)) for m in net.modules()]
    try:
        yield
    finally:
        for module, params in saved:
            module._parameters.update(params)


@contextmanager
def canonized(net: nn.Module, probe: torch.Tensor) -> Iterator[Callable[[torch.Tensor], None]]:
    """Check that LRP covers ``net``, fold its BatchNorms and rewrite its residual blocks (all
    undone on exit, errors included). ``probe`` is one network input ``[1, C, H, W]``. Yields a
    check to call with the canonical network's logits for a batch starting with ``probe``: it
    raises if canonisation changed the network's function."""
    reason = unsupported(net)
    if reason:
        raise HarnessError(reason)
    trace = _trace(net, probe)
    for name, n in trace["calls"].items():
        if n > 1 and isinstance(net.get_submodule(name), _RULED):
            raise HarnessError(f"xai=lrp: module {name!r} runs {n} times in one forward; its LRP rule needs "
                               "one call per pass")
    first = next((n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if trace["first"] != first:
        raise HarnessError(f"xai=lrp: the first layer to run ({trace['first']!r}) is not the first one "
                           f"defined ({first!r}); the first-layer rule would go to the wrong layer")
    ref = trace["logits"]

    def check(logits: torch.Tensor) -> None:
        got = logits.detach()[: len(ref)].to(ref)
        if not torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * (1.0 + float(ref.abs().max()))):
            err = float((got - ref).abs().max())
            raise HarnessError(f"xai=lrp: putting {type(net).__name__} in canonical form changed its output "
                               f"(max difference {err:.3g}); this model is not supported as built")

    with fold_batchnorm(net, probe, trace), canonical_blocks(net):
        yield check


def _composite(name: str, epsilon: float, gamma: float, stabilizer: float,
               low: torch.Tensor, high: torch.Tensor) -> Any:
    from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat, LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon
    from zennit.types import Convolution

    if name == "epsilon_plus_flat":
        return EpsilonPlusFlat(epsilon=epsilon, stabilizer=stabilizer)
    if name == "epsilon_gamma_box":
        return EpsilonGammaBox(low=low, high=high, epsilon=epsilon, gamma=gamma, stabilizer=stabilizer)
    return LayerMapComposite(layer_map=layer_map_base(stabilizer) + [
        (Convolution, Epsilon(epsilon=epsilon)),
        (nn.Linear, Epsilon(epsilon=epsilon)),
    ])


class LRP(Explainer):
    """Layer-wise relevance propagation of the target logit through a CNN (see the module doc).

    One forward and one modified backward pass with a zennit composite, on the network in
    canonical form (BatchNorm folded, residual sums as modules); the map is the relevance of the
    normalised network input summed over colour channels. Vision transformers are refused (use
    xai=attnlrp or xai=cplrp).

    References:
        Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by
        Layer-Wise Relevance Propagation", PLoS ONE 2015.
        Montavon et al., "Layer-Wise Relevance Propagation: An Overview", Springer LNCS 11700,
        2019.
        Kohlbrenner et al., "Towards Best Practice in Explaining Neural Network Decisions with
        LRP", IJCNN 2020 (the composites).
        Anders et al., "Software for Dataset-wide XAI: From Local Explanations to Global
        Insights with Zennit, CoRelAy, and ViRelAy", 2021 (arXiv:2106.13200).

    Args:
        composite: ``epsilon_plus_flat``, ``epsilon_gamma_box`` or ``epsilon``.
        epsilon: ε of the ε-rule (dense layers; every layer for ``composite=epsilon``).
        gamma: γ of the γ-rule on the convolutions after the first (``epsilon_gamma_box``).
        stabilizer: small number keeping the other rules' denominators away from zero.
    """

    needs_gradients = True
    patches_model = True
    patches_scoped = True  # tests/test_lrp.py: nothing left behind, errors included
    architectures = ("cnn",)  # vision transformers: xai=attnlrp or xai=cplrp

    def __init__(self, composite: str = "epsilon_plus_flat", epsilon: float = 1e-6, gamma: float = 0.25,
                 stabilizer: float = 1e-6) -> None:
        if composite not in COMPOSITES:
            raise HarnessError(f"xai.composite={composite!r} is not valid; valid: {', '.join(COMPOSITES)}")
        if float(epsilon) < 0 or float(gamma) < 0 or float(stabilizer) < 0:
            raise HarnessError("xai.epsilon, xai.gamma and xai.stabilizer must be >= 0")
        self.composite = composite
        self.epsilon = float(epsilon)
        self.gamma = float(gamma)
        self.stabilizer = float(stabilizer)

    def unsupported(self, model: nn.Module) -> str | None:
        return unsupported(network(model))

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        net = network(model)
        mean, std = getattr(model, "mean", None), getattr(model, "std", None)
        if net is not model and isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
            mean, std = mean.to(x), std.to(x)
        else:  # a bare network: its input is the pixels themselves
            mean, std = torch.zeros(1, x.shape[1], 1, 1).to(x), torch.ones(1, x.shape[1], 1, 1).to(x)
        z = ((x.detach() - mean) / std).requires_grad_(True)
        composite = _composite(self.composite, self.epsilon, self.gamma, self.stabilizer,
                               low=(0 - mean) / std, high=(1 - mean) / std)
        with parameters_kept(net), canonized(net, z[:1].detach()) as check, composite.context(net), \
                torch.enable_grad():
            out = net(z)
            check(out[:1])
            logit = out.detach().gather(1, targets[:, None])
            seed = torch.zeros_like(out).scatter_(1, targets[:, None], logit)
            (relevance,) = torch.autograd.grad(out, z, grad_outputs=seed)
        return relevance.detach()

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        return ModelCost(backward=1)
