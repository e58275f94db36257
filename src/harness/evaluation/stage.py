"""The metrics stage: every metric on the maps, a failing metric retried image by image, and
the per-image scores summarised (mean, standard error, bootstrap interval)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from harness.types import HarnessError, MetricOutput

log = logging.getLogger(__name__)


def aggregate(per_image: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean, standard error and a 95 % percentile-bootstrap interval of the mean of each score
    over the images where it is finite (Efron & Tibshirani 1993)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, v in per_image.items():
        v = v[np.isfinite(v)]
        if len(v):
            out[name] = float(v.mean())
            out[f"{name}_sem"] = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
            means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
            out[f"{name}_ci95_low"], out[f"{name}_ci95_high"] = map(float, np.percentile(means, [2.5, 97.5]))
    return out


def _score_one_by_one(metric: Any, model: torch.nn.Module, x: torch.Tensor, maps: np.ndarray,
                      targets: torch.Tensor, masks: np.ndarray | None, kwargs: dict, first: Exception) -> MetricOutput:
    """After a metric failed on a batch: score each image alone; failures score NaN with the reason."""
    parts: list[MetricOutput | None] = []
    errors: list[tuple[int, str]] = []
    for i in range(len(x)):
        try:
            parts.append(metric(model, x[i : i + 1], maps[i : i + 1], targets[i : i + 1],
                                None if masks is None else masks[i : i + 1], **kwargs))
        except HarnessError:
            raise
        except Exception as e:  # noqa: BLE001 - one image's failure must not end the run
            parts.append(None)
            errors.append((i, f"{type(e).__name__}: {e}"))
    ok = [p for p in parts if p is not None]
    if not ok:
        return MetricOutput(scores={}, errors=errors or [(i, f"{type(first).__name__}: {first}") for i in range(len(x))])
    ref = ok[0]
    nan_row = lambda v: np.full(np.shape(v)[1:], np.nan)  # noqa: E731
    return MetricOutput(
        scores={k: np.array([p.scores[k][0] if p else np.nan for p in parts]) for k in ref.scores},
        curves={k: np.stack([p.curves[k][0] if p else nan_row(v) for p in parts]) for k, v in ref.curves.items()},
        curve_x=ref.curve_x, higher_is_better=ref.higher_is_better,
        errors=errors + [(i, e) for i, p in enumerate(parts) if p for _, e in p.errors])


def evaluate(metrics: dict[str, Any], model: torch.nn.Module, x: torch.Tensor, maps: np.ndarray,
             targets: torch.Tensor, masks: np.ndarray | None,
             explain_fn: Any = None) -> dict[str, MetricOutput]:
    """Run every metric. A metric that needs masks is skipped (with a warning) when none exist;
    one that re-explains inputs (``needs_explainer``) gets ``explain_fn(model, x, targets)``. A
    metric that fails is retried image by image: the images it fails on score NaN, and the
    reasons are kept in ``MetricOutput.errors``."""
    from tqdm.auto import tqdm

    out = {}
    for name, metric in tqdm(metrics.items(), desc="metrics", disable=None if len(metrics) > 1 else True):
        if getattr(metric, "needs_masks", False) and masks is None:
            log.warning("metric %s needs ground-truth masks and this dataset has none: skipped", name)
            continue
        kwargs = {}
        if getattr(metric, "needs_explainer", False):
            if explain_fn is None:
                raise HarnessError(f"metric {name} re-explains inputs and needs the explainer")
            kwargs["explain"] = explain_fn
        t0 = time.perf_counter()
        try:
            out[name] = metric(model, x, maps, targets, masks, **kwargs)
        except HarnessError:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("metric %s failed on the batch (%s: %s); scoring image by image", name, type(e).__name__, e)
            out[name] = _score_one_by_one(metric, model, x, maps, targets, masks, kwargs, e)
        if out[name].errors:
            log.warning("metric %s failed on %d of %d images, scored NaN (first: %s)",
                        name, len(out[name].errors), len(x), out[name].errors[0][1])
        log.info("metric %s took %.1f s", name, time.perf_counter() - t0)
        for other, res in list(out.items())[:-1]:
            if clash := set(res.scores) & set(out[name].scores):
                raise HarnessError(f"metrics {other} and {name} both log {sorted(clash)}; give one "
                                   f"another name (e.g. metrics.{name}.name=...)")
    return out


def score_info(metrics: dict[str, Any], results: dict[str, MetricOutput]) -> dict[str, dict[str, Any]]:
    """For every logged score: the metric option that made it, its family and direction, for
    reports to sort and mark the best correctly."""
    return {score: {"metric": name, "family": getattr(metrics[name], "family", "other"),
                    "higher_is_better": bool(r.higher_is_better.get(score, getattr(metrics[name], "higher_is_better", True)))}
            for name, r in results.items() for score in r.scores}
