"""Randomisation sanity checks (Adebayo et al. 2018): an explanation should change when the
model's parameters or the explained class do."""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from harness.evaluation.base import Metric
from harness.evaluation.robustness import ExplainFn, normalise_by_max
from harness.types import HarnessError, MetricOutput
from harness.xai.base import image_seed, model_device


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every module that has ``reset_parameters`` re-initialised,
    first to last, each after ``torch.manual_seed(seed + 1)``: the fully randomised model of
    Quantus' cascading ``get_random_layer_generator`` (its last yield). The global torch RNG is
    left as it was."""
    rand = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        for _, module in rand.named_modules():
            if hasattr(module, "reset_parameters"):
                torch.manual_seed(seed + 1)
                module.reset_parameters()
    return rand.eval()


def entropy(a: np.ndarray, n_bins: int) -> float:
    """Shannon entropy (nats) of the ``n_bins``-bin histogram of a map's values (Quantus'
    ``discrete_entropy``)."""
    hist, _ = np.histogram(a, bins=n_bins)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log(p)).sum())


class EfficientMPRT(Metric):
    """Efficient model parameter randomisation test (eMPRT): how much more complex does the
    explanation become when the model's parameters are randomised?

    The image is explained again on a copy of the model whose layers are all re-initialised
    (:func:`randomised`); the score is the relative rise in the maps' discrete entropy,
    ``(H(a_random) - H(a)) / H(a)``, with ``H`` the entropy of an ``n_bins``-bin histogram of the
    map's values. Higher is better: an explanation that depends on what the model learned turns
    to noise. One extra explanation per image, unlike MPRT's one per layer. As Quantus'
    ``EfficientMPRT`` with ``skip_layers=True`` (the tests check the scores are equal), except
    that ``n_bins`` is fixed instead of chosen from the whole batch, so a score depends on its
    image alone. A constant map (entropy 0) scores NaN.

    References:
        Hedström et al., "Sanity Checks Revisited: An Exploration to Repair the Model Parameter
        Randomisation Test", XAI in Action workshop, NeurIPS 2023.
        Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018.

    Args:
        n_bins: histogram bins of the entropy.
        seed: seeds the re-initialisation.
        name: the logged score's name.
    """

    family: ClassVar[str] = "randomisation"
    needs_explainer: ClassVar[bool] = True

    def __init__(self, n_bins: int = 100, seed: int = 42, name: str = "emprt") -> None:
        super().__init__(name)
        self.n_bins = int(n_bins)
        if self.n_bins < 2:
            raise HarnessError(f"metrics.{self.name}.n_bins must be >= 2, got {n_bins}")
        self.seed = int(seed)

    def explanations_needed(self) -> int:
        return 1

    def __call__(self, model: nn.Module, x: torch.Tensor, attributions: np.ndarray, targets: torch.Tensor,
                 masks: np.ndarray | None = None, *, explain: ExplainFn) -> MetricOutput:
        rand_maps = np.asarray(explain(randomised(model, self.seed), x, targets), dtype=np.float64)
        before = np.array([entropy(m, self.n_bins) for m in np.asarray(attributions, dtype=np.float64)])
        after = np.array([entropy(m, self.n_bins) for m in rand_maps])
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = np.where(before > 0, (after - before) / before, np.nan)
        return MetricOutput(scores={self.name: scores})


class RandomLogit(Metric):
    """Random logit test: is the explanation of the predicted class different from that of a
    random other class?

    Each image is explained again for a class drawn uniformly from the other classes (from
    ``seed`` and the image's bytes); the score is the structural similarity (SSIM, Quantus'
    ``ssim``: scikit-image with the data range of the pair) between the two maps, each divided
    by its largest magnitude first (Quantus' ``normalise``, per image here). Lower is better: a
    class-sensitive explanation changes with the class. Quantus 0.6.0's ``RandomLogit`` passes
    the flattened maps to ``ssim`` (a 1-D window along rows); here the maps keep their 2-D shape,
    as SSIM is defined on images. With two classes (the other class is then fixed) the tests
    check both against ``ssim`` on the same pair of maps.

    References:
        Sixt, Granz & Landgraf, "When Explanations Lie: Why Many Modified BP Attributions Fail",
        ICML 2020.

    Args:
        normalise: divide each map by its largest magnitude before comparing.
        abs: compare magnitudes.
        seed: seeds the choice of the other class.
        name: the logged score's name.
    """

    higher_is_better: ClassVar[bool] = False
    family: ClassVar[str] = "randomisation"
    needs_explainer: ClassVar[bool] = True

    def __init__(self, normalise: bool = True, abs: bool = False, seed: int = 0,  # noqa: A002 - Quantus' name
                 name: str = "random_logit") -> None:
        super().__init__(name)
        self.normalise = bool(normalise)
        self.abs = bool(abs)
        self.seed = int(seed)

    def explanations_needed(self) -> int:
        return 1

    def other_classes(self, x: torch.Tensor, targets: torch.Tensor, n_classes: int) -> torch.Tensor:
        """For each image a class other than its target, drawn from ``seed`` and its bytes."""
        out = []
        for img, t in zip(x.detach().cpu(), targets.tolist()):
            c = int(np.random.default_rng(image_seed(self.seed, img)).integers(n_classes - 1))
            out.append(c + (c >= t))
        return torch.tensor(out, dtype=torch.long)

    def _prepare(self, a: np.ndarray) -> np.ndarray:
        a = normalise_by_max(a) if self.normalise else a
        return np.abs(a) if self.abs else a

    def __call__(self, model: nn.Module, x: torch.Tensor, attributions: np.ndarray, targets: torch.Tensor,
                 masks: np.ndarray | None = None, *, explain: ExplainFn) -> MetricOutput:
        from quantus.functions.similarity_func import ssim

        with torch.no_grad():
            n_classes = model(x[:1].to(model_device(model))).shape[1]
        if n_classes < 2:
            raise HarnessError(f"metrics.{self.name} needs a model with at least 2 classes")
        other = self.other_classes(x, targets, n_classes)
        a = self._prepare(np.asarray(attributions, dtype=np.float64))
        b = self._prepare(np.asarray(explain(model, x, other), dtype=np.float64))
        scores = np.full(len(x), np.nan)
        for i in range(len(x)):
            if np.ptp(np.concatenate([a[i].ravel(), b[i].ravel()])) > 0:
                scores[i] = float(ssim(a[i], b[i]))
        return MetricOutput(scores={self.name: scores})
