"""Plain-gradient attributions: saliency, input × gradient, SmoothGrad and its variants."""

from __future__ import annotations

import torch
from torch import nn

from harness.types import HarnessError
from harness.xai.base import Explainer, ModelCost, check_fill, fill_like, image_seed

#: How the colour channels of a gradient become one map (``xai.reduce``).
REDUCTIONS = ("max_abs", "sum_abs", "sum", "mean_abs", "l2")
#: The reductions that take |gradient| first (SmoothGrad averages the magnitudes).
ABS_REDUCTIONS = ("max_abs", "sum_abs", "mean_abs")
#: The input the gradient is taken with respect to (``xai.space``).
SPACES = ("pixel", "normalized")


def target_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d logit[target] / d x for every image of the batch, in one backward pass."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = model(x).gather(1, targets[:, None]).sum()
        (grad,) = torch.autograd.grad(out, x)
    return grad


def check_reduce(reduce: str) -> str:
    if reduce not in REDUCTIONS:
        raise HarnessError(f"xai.reduce={reduce!r} is not valid; valid: {', '.join(REDUCTIONS)}")
    return reduce


def check_space(space: str) -> str:
    if space not in SPACES:
        raise HarnessError(f"xai.space={space!r} is not valid; valid: {', '.join(SPACES)}")
    return space


def reduce_channels(g: torch.Tensor, reduce: str) -> torch.Tensor:
    """``[N, C, H, W]`` to ``[N, H, W]`` by ``reduce`` (one of :data:`REDUCTIONS`)."""
    if reduce == "max_abs":
        return g.abs().amax(1)
    if reduce == "sum_abs":
        return g.abs().sum(1)
    if reduce == "sum":
        return g.sum(1)
    if reduce == "mean_abs":
        return g.abs().mean(1)
    return torch.linalg.vector_norm(g, dim=1)


def normalisation(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's per-channel ``mean`` and ``std`` (as ``x``'s dtype and device), which map a
    [0, 1] image to the network's input ``(x - mean) / std``."""
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if not (isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor)):
        raise HarnessError(f"xai.space=normalized needs the model's normalisation, the mean and std buffers of a "
                           f"harness Classifier; {type(model).__name__} has none, so there is no normalised input "
                           f"to differentiate by: use xai.space=pixel")
    return mean.to(x), std.to(x)


class Saliency(Explainer):
    """Gradient of the target logit with respect to the input pixels.

    References:
        Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks: Visualising Image
        Classification Models and Saliency Maps", ICLR workshop 2014.

    Args:
        reduce: how the colour channels become one map: ``max_abs`` (max over channels of
            |gradient|, the paper's), ``sum_abs``, ``sum`` (signed), ``mean_abs`` or ``l2`` (the
            L2 norm over channels).
        space: ``pixel``: the gradient with respect to the [0, 1] image; ``normalized``: with
            respect to the network's normalised input ``(x - mean) / std``, i.e. the pixel
            gradient times ``std`` per channel (needs a harness Classifier).
    """

    needs_gradients = True

    def __init__(self, reduce: str = "max_abs", space: str = "pixel") -> None:
        self.reduce = check_reduce(reduce)
        self.space = check_space(space)

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        return ModelCost(backward=1)

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        g = target_gradient(model, x, targets)
        if self.space == "normalized":
            g = g * normalisation(model, x)[1]  # chain rule: d/dz = d/dx * dx/dz, x = z * std + mean
        return reduce_channels(g, self.reduce)


class InputXGradient(Explainer):
    """Input times gradient, summed over colour channels.

    References:
        Shrikumar et al., "Not Just a Black Box: Learning Important Features Through Propagating
        Activation Differences", 2016 (arXiv:1605.01713).

    Args:
        baseline: ``"model_mean"`` multiplies the gradient by the input's offset from the model's
            normalisation mean (the input as the network sees it, up to scale); ``0.0`` by the
            raw pixel values.
    """

    needs_gradients = True

    def __init__(self, baseline: float | str = "model_mean") -> None:
        self.baseline = check_fill(baseline, "xai.baseline")

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        return ModelCost(backward=1)

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ref = fill_like(model, x, self.baseline, "xai.baseline")
        return ((x - ref) * target_gradient(model, x, targets)).sum(1)


class SmoothGrad(Explainer):
    """Gradients averaged over noisy copies of the input.

    ``variant``: ``smoothgrad`` (mean gradient, Smilkov et al. 2017), ``smoothgrad_sq`` (mean
    squared gradient) or ``vargrad`` (variance of the gradient, Adebayo et al. 2018). All three
    come from the same noisy gradients, so they cost the same.

    References:
        Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017 (arXiv:1706.03825).
        Adebayo et al., "Local Explanation Methods for Deep Neural Networks Lack Sensitivity to
        Parameter Values", ICLR workshop 2018.

    Args:
        n_samples: noisy copies per image.
        noise_level: noise standard deviation as a share of the input range (max - min), of the
            [0, 1] image or, with ``space: normalized``, of the normalised one.
        variant: ``smoothgrad``, ``smoothgrad_sq`` or ``vargrad``.
        reduce: how the colour channels become one map, after the variant's statistic over the
            noisy gradients: ``max_abs``, ``sum_abs`` and ``mean_abs`` take the statistic of
            |gradient| and then the max / sum / mean over channels (``max_abs`` is captum's
            ``NoiseTunnel(Saliency)``, which benchmarks such as Blücher et al. 2024 run); ``sum``
            and ``l2`` take it of the signed gradient, then its channel sum or L2 norm.
        space: ``pixel``: noise on and gradients of the [0, 1] image; ``normalized``: noise on
            and gradients of the network's normalised input ``(x - mean) / std`` (needs a
            harness Classifier).
        multiply_by_inputs: multiply the mean (signed) gradient by the input (in ``space``) before
            the channel sum (SmoothGrad × input; needs ``reduce: sum``).
        batch_size: noisy images per backward pass.
        seed: seeds the noise; each image's noise comes from the seed and the image's own bytes,
            so a map does not depend on the batch it was computed in.
    """

    needs_gradients = True
    VARIANTS = ("smoothgrad", "smoothgrad_sq", "vargrad")

    def __init__(self, n_samples: int = 32, noise_level: float = 0.15, variant: str = "smoothgrad",
                 reduce: str = "max_abs", space: str = "pixel", multiply_by_inputs: bool = False,
                 batch_size: int = 256, seed: int = 0) -> None:
        if variant not in self.VARIANTS:
            raise HarnessError(f"xai.variant={variant!r} is not valid; valid: {', '.join(self.VARIANTS)}")
        self.reduce = check_reduce(reduce)
        self.space = check_space(space)
        if multiply_by_inputs and self.reduce != "sum":
            raise HarnessError(f"xai.multiply_by_inputs=true multiplies the signed mean gradient by the input and "
                               f"sums the channels: set xai.reduce=sum with it (not {self.reduce})")
        self.n_samples = int(n_samples)
        self.noise_level = float(noise_level)
        self.variant = variant
        self.multiply_by_inputs = bool(multiply_by_inputs)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """One gradient per noisy copy."""
        return ModelCost(backward=self.n_samples)

    def _noise(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        """[S, N, C, H, W] noise with std ``noise_level`` times the range of each image of ``ref``
        (default ``x``); each image's noise is seeded by the content of ``x``, not its batch."""
        ref = x if ref is None else ref
        out = []
        for img in x.detach().cpu():
            g = torch.Generator().manual_seed(image_seed(self.seed, img))
            out.append(torch.randn((self.n_samples, *img.shape), generator=g))
        sigma = self.noise_level * (ref.amax(dim=(1, 2, 3)) - ref.amin(dim=(1, 2, 3))).clamp_min(1e-6)
        return torch.stack(out, 1).to(x) * sigma.view(1, -1, 1, 1, 1)

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if self.space == "normalized":
            mean, std = normalisation(model, x)
            inputs = (x - mean) / std
            # noise z + e in the normalised space is x + e * std in pixels; d/dz = d/dx * std
            noisy = (x[None] + self._noise(x, inputs) * std).reshape(-1, *x.shape[1:])
        else:
            std, inputs = None, x
            noisy = (x[None] + self._noise(x)).reshape(-1, *x.shape[1:])
        t = targets.repeat(self.n_samples)
        grads = torch.cat([
            target_gradient(model, noisy[i : i + self.batch_size], t[i : i + self.batch_size])
            for i in range(0, len(noisy), self.batch_size)
        ]).reshape(self.n_samples, n, *x.shape[1:])
        if std is not None:
            grads = grads * std
        if self.reduce in ABS_REDUCTIONS:
            grads = grads.abs()
        if self.variant == "smoothgrad":
            g = grads.mean(0)
        elif self.variant == "smoothgrad_sq":
            g = (grads**2).mean(0)
        else:
            g = grads.var(0, unbiased=False)
        if self.multiply_by_inputs:
            return (g * inputs).sum(1)
        return reduce_channels(g, self.reduce)
