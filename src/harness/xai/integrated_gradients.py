"""Integrated gradients through captum."""

from __future__ import annotations

import torch
from torch import nn

from harness.types import HarnessError
from harness.xai.base import Explainer


class IntegratedGradients(Explainer):
    """Integrated gradients summed over colour channels.

    References:
        Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017.

    Args:
        n_steps: points on the path from baseline to input.
        baseline: the baseline image: ``"model_mean"`` (the model's normalisation mean, i.e. the
            usual all-zero baseline in the network's input space) or a constant pixel value in
            [0, 1] (inputs live in [0, 1]; ``0.0`` is black).
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
        if isinstance(baseline, str) and baseline != "model_mean":
            raise HarnessError(f"xai.baseline={baseline!r} is not valid: model_mean or a number in [0, 1]")
        self.baseline = baseline if isinstance(baseline, str) else float(baseline)
        self.method = method
        self.internal_batch_size = internal_batch_size
        self.multiply_by_inputs = multiply_by_inputs

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from captum.attr import IntegratedGradients as CaptumIG

        if self.baseline == "model_mean":
            mean = getattr(model, "mean", None)
            if mean is None:
                raise HarnessError("xai.baseline=model_mean needs a harness Classifier")
            base = mean.to(x).expand_as(x).contiguous()
        else:
            base = torch.full_like(x, self.baseline)
        ig = CaptumIG(model, multiply_by_inputs=self.multiply_by_inputs)
        return ig.attribute(
            x,
            baselines=base,
            target=targets,
            n_steps=self.n_steps,
            method=self.method,
            internal_batch_size=self.internal_batch_size,
        )
