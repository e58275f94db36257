"""Saliency's and SmoothGrad's ``reduce`` (channels to one map) and ``space`` (pixel or the
network's normalised input): each against a direct torch.autograd computation and captum, the
defaults against the numbers the code gave before the options existed, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_cfg
from hydra.utils import instantiate
from torch import nn

from harness.models.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from harness.types import HarnessError
from harness.xai.base import image_seed
from harness.xai.gradients import REDUCTIONS, Saliency, SmoothGrad


EXPECTED = {  # each reduction written out on a [N, C, H, W] gradient
    "max_abs": lambda g: g.abs().max(dim=1).values,
    "sum_abs": lambda g: g.abs().sum(dim=1),
    "sum": lambda g: g.sum(dim=1),
    "mean_abs": lambda g: g.abs().sum(dim=1) / g.shape[1],
    "l2": lambda g: (g**2).sum(dim=1).sqrt(),
}


def tiny_model() -> Classifier:
    """A seeded conv net with a per-channel normalisation that is not one number for all channels."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return Classifier(net, input_size=6, mean=IMAGENET_MEAN, std=IMAGENET_STD).eval()


@pytest.fixture(scope="module")
def data():
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    return tiny_model(), x, torch.tensor([0, 2])


def pixel_grad(model, x, t):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x)[torch.arange(len(x)), t].sum(), x)
    return g


def normalised_grad(model, z, t):
    """The gradient with respect to the network's own input, bypassing the Classifier."""
    z = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.net(z)[torch.arange(len(z)), t].sum(), z)
    return g


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_saliency_reduction_equals_autograd(data, reduce):
    model, x, t = data
    close(Saliency(reduce=reduce).explain(model, x, t), EXPECTED[reduce](pixel_grad(model, x, t)))


def test_saliency_equals_captum(data):
    from captum.attr import Saliency as CaptumSaliency

    model, x, t = data
    sal = CaptumSaliency(model)
    close(Saliency(reduce="max_abs").explain(model, x, t), sal.attribute(x.clone(), target=t, abs=True).amax(1))
    close(Saliency(reduce="sum").explain(model, x, t), sal.attribute(x.clone(), target=t, abs=False).sum(1))


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_normalized_saliency_is_pixel_gradient_times_std(data, reduce):
    model, x, t = data
    g = pixel_grad(model, x, t)
    chain = EXPECTED[reduce](g * model.std)
    direct = EXPECTED[reduce](normalised_grad(model, (x - model.mean) / model.std, t))
    close(chain, direct)  # the chain rule and differentiating by the normalised tensor agree
    out = Saliency(reduce=reduce, space="normalized").explain(model, x, t)
    close(out, direct)
    assert not torch.allclose(out, EXPECTED[reduce](g))  # std differs per channel: not the pixel map


def legacy_smoothgrad(model, x, t, n_samples, noise_level, variant, abs_, multiply_by_inputs, seed):
    """SmoothGrad as the code computed it before ``reduce`` and ``space`` (abs: true/false)."""
    noise = []
    for img in x:
        g = torch.Generator().manual_seed(image_seed(seed, img))
        noise.append(torch.randn((n_samples, *img.shape), generator=g))
    sigma = noise_level * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).clamp_min(1e-6)
    noisy = (x[None] + torch.stack(noise, 1) * sigma.view(1, -1, 1, 1, 1)).reshape(-1, *x.shape[1:])
    grads = pixel_grad(model, noisy, t.repeat(n_samples)).reshape(n_samples, len(x), *x.shape[1:])
    if abs_:
        grads = grads.abs()
    g = {"smoothgrad": lambda: grads.mean(0), "smoothgrad_sq": lambda: (grads**2).mean(0),
         "vargrad": lambda: grads.var(0, unbiased=False)}[variant]()
    if multiply_by_inputs:
        return (g * x).sum(1)
    return g.amax(1) if abs_ else g.sum(1)


@pytest.mark.parametrize("variant", SmoothGrad.VARIANTS)
def test_smoothgrad_defaults_keep_their_numbers(data, variant):
    model, x, t = data
    kw = {"n_samples": 3, "noise_level": 0.2, "variant": variant, "seed": 5}
    for abs_, reduce in ((True, "max_abs"), (False, "sum")):
        old = legacy_smoothgrad(model, x, t, 3, 0.2, variant, abs_, False, 5)
        new = SmoothGrad(**kw, reduce=reduce).explain(model, x, t)
        close(new, old)
    assert torch.equal(SmoothGrad(**kw).explain(model, x, t), SmoothGrad(**kw, reduce="max_abs").explain(model, x, t))
    close(SmoothGrad(**kw, reduce="sum", multiply_by_inputs=True).explain(model, x, t),
          legacy_smoothgrad(model, x, t, 3, 0.2, variant, False, True, 5))
    # the batch a noisy copy is in does not matter
    close(SmoothGrad(**kw, batch_size=2).explain(model, x, t), SmoothGrad(**kw).explain(model, x, t))


def noise_draws(x, n_samples, seed):
    return torch.stack([torch.randn((n_samples, *img.shape), generator=torch.Generator().manual_seed(
        image_seed(seed, img))) for img in x], 1)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_smoothgrad_reduction_after_averaging(data, reduce):
    """|g| per noisy copy (for the *_abs reductions), the mean, then the channel reduction."""
    model, x, t = data
    s, level = 4, 0.1
    sigma = level * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    noisy = x[None] + noise_draws(x, s, 0) * sigma.view(1, -1, 1, 1, 1)
    grads = torch.stack([pixel_grad(model, noisy[i], t) for i in range(s)])
    mean = (grads.abs() if reduce.endswith("_abs") else grads).mean(0)
    close(SmoothGrad(n_samples=s, noise_level=level, reduce=reduce).explain(model, x, t), EXPECTED[reduce](mean))


@pytest.mark.parametrize("reduce", ["max_abs", "sum", "l2"])
def test_normalized_smoothgrad_adds_noise_in_the_normalised_space(data, reduce):
    model, x, t = data
    s, level = 4, 0.1
    z = (x - model.mean) / model.std
    sigma = level * (z.amax(dim=(1, 2, 3)) - z.amin(dim=(1, 2, 3)))  # of the normalised image
    noisy = z[None] + noise_draws(x, s, 0) * sigma.view(1, -1, 1, 1, 1)
    grads = torch.stack([normalised_grad(model, noisy[i], t) for i in range(s)])
    mean = (grads.abs() if reduce.endswith("_abs") else grads).mean(0)
    ex = SmoothGrad(n_samples=s, noise_level=level, reduce=reduce, space="normalized")
    close(ex.explain(model, x, t), EXPECTED[reduce](mean))
    if reduce == "sum":  # SmoothGrad x input: the normalised input
        close(SmoothGrad(n_samples=s, noise_level=level, reduce="sum", space="normalized",
                         multiply_by_inputs=True).explain(model, x, t), (grads.mean(0) * z).sum(1))


def test_invalid_values_name_the_valid_ones():
    with pytest.raises(HarnessError, match=r"xai.reduce='max' is not valid; valid: max_abs, sum_abs, sum, mean_abs, l2"):
        Saliency(reduce="max")
    with pytest.raises(HarnessError, match=r"xai.reduce='abs' is not valid; valid: max_abs"):
        SmoothGrad(reduce="abs")
    for cls in (Saliency, SmoothGrad):
        with pytest.raises(HarnessError, match=r"xai.space='normalised' is not valid; valid: pixel, normalized"):
            cls(space="normalised")


def test_multiply_by_inputs_needs_a_signed_sum():
    for kw in ({}, {"reduce": "l2"}, {"reduce": "sum_abs"}):
        with pytest.raises(HarnessError, match=r"xai.multiply_by_inputs=true .*set xai.reduce=sum"):
            SmoothGrad(multiply_by_inputs=True, **kw)
    assert SmoothGrad(multiply_by_inputs=True, reduce="sum").reduce == "sum"


def test_normalized_needs_a_classifier(data):
    _, x, t = data
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 3))
    assert Saliency()(plain, x, t).shape == (2, 6, 6)  # pixel space needs no normalisation
    for ex in (Saliency(space="normalized"), SmoothGrad(n_samples=2, space="normalized")):
        with pytest.raises(HarnessError, match=r"xai.space=normalized needs the model's normalisation.*"
                                               r"Sequential has none.*xai.space=pixel"):
            ex(plain, x, t)


def test_yaml_defaults(data):
    model, x, t = data
    sal = instantiate(make_cfg(["xai=saliency"]).xai)
    assert (sal.reduce, sal.space) == ("max_abs", "pixel")
    np.testing.assert_array_equal(sal(model, x, t), Saliency(reduce="max_abs")(model, x, t))
    sg = instantiate(make_cfg(["xai=smoothgrad"]).xai)
    assert (sg.reduce, sg.space, sg.variant) == ("max_abs", "pixel", "smoothgrad")
    assert instantiate(make_cfg(["xai=smoothgrad", "xai.reduce=sum", "xai.multiply_by_inputs=true"]).xai).reduce == "sum"
    assert instantiate(make_cfg(["xai=saliency", "xai.reduce=l2", "xai.space=normalized"]).xai).space == "normalized"
