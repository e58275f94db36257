"""Plain-gradient attributions: saliency, input × gradient, SmoothGrad and its variants."""

from __future__ import annotations


import torch
from torch import nn

from harness.types import HarnessError
from harness.xai.base import Explainer, ModelCost, check_fill, fill_like, image_seed


def target_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d logit[target] / d x for every image of the batch, in one backward pass."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = model(x).gather(1, targets[:, None]).sum()
        (grad,) = torch.autograd.grad(out, x)
    return grad


class Saliency(Explainer):
    """Gradient of the target logit with respect to the input pixels.

    References:
        Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks: Visualising Image
        Classification Models and Saliency Maps", ICLR workshop 2014.

    Args:
        abs: take |gradient| (as the paper) before summing the colour channels; otherwise the
            signed channel sum.
    """

    needs_gradients = True

    def __init__(self, abs: bool = True) -> None:  # noqa: A002 - the paper's name for it
        self.abs = bool(abs)

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        return ModelCost(backward=1)

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        g = target_gradient(model, x, targets)
        return g.abs().amax(1) if self.abs else g.sum(1)


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
        noise_level: noise standard deviation as a share of the input range (max - min).
        variant: ``smoothgrad``, ``smoothgrad_sq`` or ``vargrad``.
        abs: average gradient magnitudes and keep the largest over the colour channels, as
            :class:`Saliency` does (captum's ``NoiseTunnel(Saliency)``, which benchmarks such as
            Blücher et al. 2024 run); ``false``: signed gradients summed over the channels.
        multiply_by_inputs: multiply the mean (signed) gradient by the input (SmoothGrad × input;
            needs ``abs: false``).
        batch_size: noisy images per backward pass.
        seed: seeds the noise; each image's noise comes from the seed and the image's own bytes,
            so a map does not depend on the batch it was computed in.
    """

    needs_gradients = True
    VARIANTS = ("smoothgrad", "smoothgrad_sq", "vargrad")

    def __init__(self, n_samples: int = 32, noise_level: float = 0.15, variant: str = "smoothgrad",
                 abs: bool = True, multiply_by_inputs: bool = False, batch_size: int = 256,  # noqa: A002
                 seed: int = 0) -> None:
        if variant not in self.VARIANTS:
            raise HarnessError(f"xai.variant={variant!r} is not valid; valid: {', '.join(self.VARIANTS)}")
        if abs and multiply_by_inputs:
            raise HarnessError("xai.multiply_by_inputs=true multiplies the signed mean gradient by the input: "
                               "set xai.abs=false with it")
        self.abs = bool(abs)
        self.n_samples = int(n_samples)
        self.noise_level = float(noise_level)
        self.variant = variant
        self.multiply_by_inputs = bool(multiply_by_inputs)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """One gradient per noisy copy."""
        return ModelCost(backward=self.n_samples)

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        """[S, N, C, H, W] noise; each image's noise is seeded by its content, not its batch."""
        out = []
        for img in x.detach().cpu():
            g = torch.Generator().manual_seed(image_seed(self.seed, img))
            out.append(torch.randn((self.n_samples, *img.shape), generator=g))
        sigma = self.noise_level * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).clamp_min(1e-6)
        return torch.stack(out, 1).to(x) * sigma.view(1, -1, 1, 1, 1)

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = len(x)
        noisy = (x[None] + self._noise(x)).reshape(-1, *x.shape[1:])
        t = targets.repeat(self.n_samples)
        grads = torch.cat([
            target_gradient(model, noisy[i : i + self.batch_size], t[i : i + self.batch_size])
            for i in range(0, len(noisy), self.batch_size)
        ]).reshape(self.n_samples, n, *x.shape[1:])
        if self.abs:
            grads = grads.abs()
        if self.variant == "smoothgrad":
            g = grads.mean(0)
        elif self.variant == "smoothgrad_sq":
            g = (grads**2).mean(0)
        else:
            g = grads.var(0, unbiased=False)
        if self.multiply_by_inputs:
            return (g * x).sum(1)
        return g.amax(1) if self.abs else g.sum(1)
