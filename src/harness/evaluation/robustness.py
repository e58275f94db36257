"""Robustness: how much does the explanation change when the input barely does?"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from harness.evaluation.base import Metric
from harness.types import HarnessError, MetricOutput
from harness.xai.base import image_seed

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], np.ndarray]


def normalise_by_max(a: np.ndarray) -> np.ndarray:
    """Each map divided by its largest magnitude (all-zero maps stay zero)."""
    m = np.abs(a).reshape(len(a), -1).max(1).reshape(-1, *([1] * (a.ndim - 1)))
    return np.divide(a, m, out=np.zeros_like(a), where=m > 0)


class MaxSensitivity(Metric):
    """Max-sensitivity: the largest relative change of the explanation under small input noise.

    Each image gets ``nr_samples`` noisy copies ``x + u``, ``u ~ U(-radius, radius)`` on every
    input value (pixel units, [0, 1]); each copy is explained again through the explainer
    interface, for the same target. The score is
    ``max_s ||a(x) - a(x + u_s)||_F / ||a(x)||_F``: 0 for an explanation that does not move,
    lower is better. An all-zero map scores NaN. As in Quantus' ``MaxSensitivity`` (whose
    ``lower_bound`` is our ``radius``), the maps are compared as they are (``normalise: false``)
    unless asked; the noise comes from ``seed`` and each image's bytes, so a score does not
    depend on the batch. The tests check that Quantus gives the same scores for the same noise.

    References:
        Yeh et al., "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019.

    Args:
        nr_samples: noisy copies per image (Quantus' default is 200; each costs one explanation).
        radius: half-width of the uniform noise, in pixel units.
        normalise: divide every map by its largest magnitude before comparing.
        seed: seeds the noise.
        name: the logged score's name.
    """

    higher_is_better: ClassVar[bool] = False
    family: ClassVar[str] = "robustness"
    needs_explainer: ClassVar[bool] = True

    def __init__(self, nr_samples: int = 10, radius: float = 0.05, normalise: bool = False, seed: int = 0,
                 name: str = "max_sensitivity") -> None:
        super().__init__(name)
        self.nr_samples = int(nr_samples)
        self.radius = float(radius)
        if self.nr_samples < 1 or self.radius < 0:
            raise HarnessError(f"metrics.{self.name}: nr_samples must be >= 1 and radius >= 0 "
                               f"(got {nr_samples}, {radius})")
        self.normalise = bool(normalise)
        self.seed = int(seed)

    def explanations_needed(self) -> int:
        return self.nr_samples

    def noise(self, x: torch.Tensor) -> np.ndarray:
        """``[nr_samples, N, C, H, W]`` noise; each image's from ``seed`` and its bytes."""
        return np.stack([
            np.random.default_rng(image_seed(self.seed, img)).uniform(
                -self.radius, self.radius, size=(self.nr_samples, *img.shape))
            for img in x.detach().cpu()
        ], 1)

    def __call__(self, model: nn.Module, x: torch.Tensor, attributions: np.ndarray, targets: torch.Tensor,
                 masks: np.ndarray | None = None, *, explain: ExplainFn) -> MetricOutput:
        a = np.asarray(attributions, dtype=np.float64).reshape(len(x), -1)
        if self.normalise:
            a = normalise_by_max(a)
        noise = torch.from_numpy(self.noise(x)).to(x)
        ratios = np.empty((self.nr_samples, len(x)))
        denom = np.linalg.norm(a, axis=1)
        for s in range(self.nr_samples):
            b = np.asarray(explain(model, x + noise[s], targets), dtype=np.float64).reshape(len(x), -1)
            if self.normalise:
                b = normalise_by_max(b)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios[s] = np.linalg.norm(a - b, axis=1) / denom
        ratios[~np.isfinite(ratios)] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN images (all-zero maps) stay NaN
            scores = np.nanmax(ratios, 0)
        return MetricOutput(scores={self.name: scores})
