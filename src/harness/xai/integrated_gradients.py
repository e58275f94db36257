"""Integrated gradients through captum."""

from __future__ import annotations

import torch
from torch import nn

from harness.xai.base import Explainer, ModelCost, check_fill, fill_like


class IntegratedGradients(Explainer):
    """Integrated gradients summed over colour channels.

    References:
        Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017.

    Args:
        n_steps: points on the path from baseline to input.
        baseline: the baseline image: ``"model_mean"`` (the model's normalisation mean, i.e. the
            usual all-zero baseline in the network's input space), ``"mean"`` (each image's
            channel mean) or a constant pixel value in [0, 1] (``0.0`` is black).
        method: captum's integration rule (``gausslegendre``, ``riemann_trapezoid``, ...).
        internal_batch_size: images per model call inside captum (``None``: all steps at once).
        multiply_by_inputs: ``False`` gives the path-averaged gradient without the input factor.
    """

    needs_gradients = True

    def __init__(
        self,
        n_steps: int = 32,
        baseline: float | str = "model_mean",
        method: str = "gausslegendre",
        internal_batch_size: int | None = 256,
        multiply_by_inputs: bool = True,
    ) -> None:
        self.n_steps = int(n_steps)
        self.baseline = check_fill(baseline, "xai.baseline")
        self.method = method
        self.internal_batch_size = internal_batch_size
        self.multiply_by_inputs = multiply_by_inputs

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """One gradient (forward + backward) per point on the path."""
        return ModelCost(backward=self.n_steps)

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from captum.attr import IntegratedGradients as CaptumIG

        base = fill_like(model, x, self.baseline, "xai.baseline")
        ig = CaptumIG(model, multiply_by_inputs=self.multiply_by_inputs)
        return ig.attribute(
            x,
            baselines=base,
            target=targets,
            n_steps=self.n_steps,
            method=self.method,
            internal_batch_size=self.internal_batch_size,
        )
