"""Complexity and localisation metrics computed by Quantus 0.6.0 behind the harness' metric interface.

Each class wraps one Quantus metric; :class:`QuantusMetric` is the shared adapter. These metrics
read only the attribution maps (and the ground-truth masks), never the model, so Quantus is
called with ``model=None``. How the adapter calls Quantus, and why:

- **One Quantus call per image.** Quantus 0.6.0 normalises an ``a_batch`` by the largest
  magnitude over the *whole batch* (``normalise_by_max`` reduces over every axis, the batch axis
  included) and runs its input checks over the whole batch, so in a batched call an image's score
  could depend on the images next to it. A call per image makes every score a function of that
  image alone, and an exception in Quantus costs only that image: its score is NaN with the
  reason (``MetricOutput.errors``, logged as ``metric_errors.tsv``), the others are kept.
- **Degenerate maps are scored.** Quantus' ``assert_attributions`` refuses a batch whose
  attributions are all equal (constant), all zero, all one, or all negative. These maps have
  well-defined scores here (a constant map: sparseness 0, complexity ``log(H*W)``, mass accuracy
  = the mask's share of the image, AUC 0.5), and giving them NaN would drop a failing explainer's
  worst images from its mean. During the call, the check is replaced with a shape-only check
  (:func:`_degenerate_maps_allowed`, a scoped patch restored on exit, errors included; not
  thread-safe). ``check_attributions=True`` keeps Quantus' check, so such a map scores NaN.
  Where a score divides by zero (complexity or mass accuracy of an all-zero map) it is NaN.
- **numpy 2.** These five metrics do not use ``np.trapz`` (only Quantus'
  ``helpers.utils.calculate_auc`` does, for perturbation curves), so no numpy shim is needed;
  the tests pin every score to an independent computation.
- Quantus' warnings (``warnings.warn``, the ``print`` about ``abs``) and progress bars are
  silenced.

``abs`` and ``normalise`` are Quantus' own pre-processing, applied to each map in this order:
``normalise`` divides the map by its largest magnitude (``quantus.normalise_by_max``); ``abs``
then takes magnitudes. All five scores are invariant to the positive rescaling (up to Quantus'
constants: 1e-7 added before the Gini index, 1e-12 inside the entropy's log), so ``normalise``
is kept for parity with Quantus; ``abs`` changes the scores of signed maps. The defaults are
Quantus': ``abs=True`` for the complexity family, ``abs=False`` for the localisation family.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from torch import nn

from harness.evaluation.base import Metric
from harness.types import MetricOutput


@contextlib.contextmanager
def _degenerate_maps_allowed() -> Iterator[None]:
    """Within the block, Quantus checks only the shapes of attributions, not their values.

    Replaces ``quantus.helpers.asserts.assert_attributions`` (the function Quantus' metric base
    class calls on ``a_batch``) and restores the original on exit, errors included.
    """
    from quantus.helpers import asserts

    original = asserts.assert_attributions

    def shape_only(x_batch: np.ndarray, a_batch: np.ndarray) -> None:
        assert isinstance(a_batch, np.ndarray), "Attributions 'a_batch' should be of type np.ndarray."
        assert np.ndim(a_batch) == np.ndim(x_batch) and np.shape(a_batch)[0] == np.shape(x_batch)[0], (
            f"attributions {np.shape(a_batch)} do not match inputs {np.shape(x_batch)}")
        assert np.shape(a_batch)[-2:] == np.shape(x_batch)[-2:], (
            f"attributions {np.shape(a_batch)} do not match inputs {np.shape(x_batch)}")

    asserts.assert_attributions = shape_only
    try:
        yield
    finally:
        asserts.assert_attributions = original


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Quantus' warnings, its ``print`` messages and numpy's floating-point warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


class QuantusMetric(Metric):
    """Adapter: score ``[N, H, W]`` attribution maps with one Quantus metric, image by image.

    Subclasses name the Quantus class (``quantus_class``) and give the defaults in their
    signature (``abs``: Quantus' default for the metric; ``name``: the option's name); see the
    module docstring for how Quantus is called.

    Args:
        abs: take magnitudes of the attributions before scoring.
        normalise: divide each map by its largest magnitude first (Quantus' ``normalise_by_max``).
        check_attributions: keep Quantus' check that refuses constant, all-zero, all-one and
            all-negative maps (such maps then score NaN). Off by default: they are scored.
        name: the logged score's name.
    """

    quantus_class: ClassVar[str]

    def __init__(self, abs: bool, normalise: bool, check_attributions: bool, name: str) -> None:  # noqa: A002
        super().__init__(name)
        self.abs = bool(abs)
        self.normalise = bool(normalise)
        self.check_attributions = bool(check_attributions)

    def quantus_metric(self) -> Any:
        """A fresh, silent instance of the wrapped Quantus metric with this adapter's settings."""
        with _quiet():  # the import also warns (invalid escapes in Quantus' docstrings)
            import quantus

            return getattr(quantus, self.quantus_class)(
                abs=self.abs, normalise=self.normalise, disable_warnings=True, display_progressbar=False)

    def __call__(
        self,
        model: nn.Module | None,
        x: Any,
        attributions: np.ndarray,
        targets: Any,
        masks: Any = None,
    ) -> MetricOutput:
        a = np.asarray(attributions, dtype=np.float64)
        if a.ndim != 3:
            raise ValueError(f"{type(self).__name__} expects attributions [N, H, W], got {a.shape}")
        n, h, w = a.shape
        xb = _inputs(x, n, h, w)
        yb = np.zeros(n, np.int64) if targets is None else np.asarray(
            targets.cpu() if hasattr(targets, "cpu") else targets).reshape(n)
        scores = np.full(n, np.nan)
        errors: list[tuple[int, str]] = []
        if self.needs_masks and masks is None:
            return MetricOutput(scores={self.name: scores})
        metric = self.quantus_metric()
        patch = contextlib.nullcontext() if self.check_attributions else _degenerate_maps_allowed()
        with _quiet(), patch:
            for i in range(n):
                sb = None
                if self.needs_masks:
                    if masks[i] is None:
                        continue
                    sb = np.asarray(masks[i], dtype=bool).reshape(1, 1, h, w)
                try:
                    out = metric(model=None, x_batch=xb[i : i + 1], y_batch=yb[i : i + 1],
                                 a_batch=a[i].reshape(1, 1, h, w).copy(), s_batch=sb,
                                 channel_first=True, batch_size=1)
                    scores[i] = float(np.asarray(out, dtype=np.float64).reshape(-1)[0])
                except Exception as e:  # one image's failure must not end the run
                    errors.append((i, f"Quantus {self.quantus_class}: {type(e).__name__}: {e}"))
        return MetricOutput(scores={self.name: scores}, errors=errors)


def _inputs(x: Any, n: int, h: int, w: int) -> np.ndarray:
    """The inputs as numpy ``[N, C, H, W]`` (only their shape matters to these metrics)."""
    if x is None:
        return np.zeros((n, 1, h, w), np.float32)
    xb = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    if xb.ndim != 4 or xb.shape[0] != n or xb.shape[-2:] != (h, w):
        raise ValueError(f"inputs {xb.shape} do not match attributions {(n, h, w)}")
    return xb


class Sparseness(QuantusMetric):
    """Sparseness: the Gini index of the attribution magnitudes (``quantus.Sparseness``).

    In [0, 1]; higher is better (a few pixels carry the relevance). A constant map scores 0, a
    map with one non-zero pixel ``(H*W - 1) / (H*W)``. Quantus adds 1e-7 to every value first.

    References:
        Chalasani et al., "Concise Explanations of Neural Networks using Adversarial Training",
        ICML 2020.
    """

    family: ClassVar[str] = "complexity"
    quantus_class: ClassVar[str] = "Sparseness"

    def __init__(self, abs: bool = True, normalise: bool = True, check_attributions: bool = False,  # noqa: A002
                 name: str = "sparseness") -> None:
        super().__init__(abs, normalise, check_attributions, name)


class Complexity(QuantusMetric):
    """Complexity: the entropy (nats) of the attribution magnitudes as a distribution over pixels.

    ``quantus.Complexity``. Lower is better: a map with one non-zero pixel scores 0, a constant
    map ``log(H*W)``. Needs ``abs=True`` for signed maps (with ``abs=False`` a negative value
    makes the score NaN); an all-zero map scores NaN.

    References:
        Bhatt, Weller & Moura, "Evaluating and Aggregating Feature-based Model Explanations",
        IJCAI 2020.
    """

    higher_is_better: ClassVar[bool] = False
    family: ClassVar[str] = "complexity"
    quantus_class: ClassVar[str] = "Complexity"

    def __init__(self, abs: bool = True, normalise: bool = True, check_attributions: bool = False,  # noqa: A002
                 name: str = "complexity") -> None:
        super().__init__(abs, normalise, check_attributions, name)


class _Localisation(QuantusMetric):
    """Localisation metrics: scored against ground-truth masks, higher is better, signed
    relevance by default (Quantus' ``abs=False``, in each subclass's signature)."""

    family: ClassVar[str] = "localisation"
    needs_masks: ClassVar[bool] = True


class RelevanceMassAccuracy(_Localisation):
    """Relevance mass accuracy: the share of the map's total relevance inside the object mask.

    ``quantus.RelevanceMassAccuracy``: ``sum(a * mask) / sum(a)``. Higher is better: 1 when all
    relevance lies on the object, the mask's share of the image for a constant map. With
    ``abs=False`` (Quantus' default) negative relevance counts with its sign, so a signed map can
    score outside [0, 1]. Images without a mask, or with an empty one, score NaN.

    References:
        Arras, Osman & Samek, "CLEVR-XAI: A benchmark dataset for the ground truth evaluation of
        neural network explanations", Information Fusion 81, 2022.
    """

    quantus_class: ClassVar[str] = "RelevanceMassAccuracy"

    def __init__(self, abs: bool = False, normalise: bool = True, check_attributions: bool = False,  # noqa: A002
                 name: str = "relevance_mass_accuracy") -> None:
        super().__init__(abs, normalise, check_attributions, name)


class RelevanceRankAccuracy(_Localisation):
    """Relevance rank accuracy: the share of the ``K`` highest-ranked pixels that lie on the object.

    ``quantus.RelevanceRankAccuracy``, with ``K`` the number of mask pixels. In [0, 1]; higher is
    better. Ties are broken by ``np.argsort``'s order, not averaged, so maps with runs of equal
    values (LIME/SHAP superpixels, upsampled Grad-CAM, a constant map) get scores that depend on
    where the tied pixels are. Images without a mask, or with an empty one, score NaN.

    References:
        Arras, Osman & Samek, "CLEVR-XAI: A benchmark dataset for the ground truth evaluation of
        neural network explanations", Information Fusion 81, 2022.
    """

    quantus_class: ClassVar[str] = "RelevanceRankAccuracy"

    def __init__(self, abs: bool = False, normalise: bool = True, check_attributions: bool = False,  # noqa: A002
                 name: str = "relevance_rank_accuracy") -> None:
        super().__init__(abs, normalise, check_attributions, name)


class LocalisationAUC(_Localisation):
    """Area under the ROC curve of the attribution as a detector of the mask's pixels.

    ``quantus.AUC`` (scikit-learn's ``roc_curve`` and ``auc``): the probability that a random
    object pixel outranks a random background pixel (ties count half). In [0, 1]; higher is
    better; 0.5 for a constant map. Not the perturbation-curve AUCs of the faithfulness metrics.
    Images without a mask, with an empty one, or whose mask covers the whole image score NaN.

    References:
        Fawcett, "An introduction to ROC analysis", Pattern Recognition Letters 27, 2006.
    """

    quantus_class: ClassVar[str] = "AUC"

    def __init__(self, abs: bool = False, normalise: bool = True, check_attributions: bool = False,  # noqa: A002
                 name: str = "localisation_auc") -> None:
        super().__init__(abs, normalise, check_attributions, name)
