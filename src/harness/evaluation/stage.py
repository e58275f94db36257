"""The metrics stage: every metric on the maps, a failing metric retried image by image, and
the per-image scores summarised (mean, standard error, bootstrap interval)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from harness.evaluation.base import Metric, follows_naming_rule
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


def _score_one_by_one(metric: Metric, model: torch.nn.Module, x: torch.Tensor, maps: np.ndarray,
                      targets: torch.Tensor, masks: np.ndarray | None, kwargs: dict, first: Exception) -> MetricOutput:
    """After a metric failed on a batch: score each image alone; failures score NaN with the reason."""
    parts: list[MetricOutput | None] = []
    errors: list[tuple[int, str]] = []
    for i in range(len(x)):
        one = kwargs | ({"regions": {k: v[i : i + 1] for k, v in kwargs["regions"].items()}} if "regions" in kwargs else {})
        try:
            parts.append(metric(model, x[i : i + 1], maps[i : i + 1], targets[i : i + 1],
                                None if masks is None else masks[i : i + 1], **one))
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
        curve_x=ref.curve_x, curve_y=ref.curve_y, higher_is_better=ref.higher_is_better,
        errors=errors + [(i, e) for i, p in enumerate(parts) if p for _, e in p.errors])


def _rename_hint(option: str, metric: Metric, logged: set[str]) -> str:
    """The override that gives metric option ``option`` a name whose scores clash with none of
    ``logged`` (the option's own name where it is free). ``++`` sets the key whether or not the
    option's node writes it (a node added with ``+metrics.<key>={...}`` may not)."""
    candidates = [option] + [f"{metric.name}_{i}" for i in range(2, 100)]
    free = next(c for c in candidates if c != metric.name and not any(follows_naming_rule(c, k) for k in logged))
    return f"++metrics.{option}.name={free}"


def _clash(other: str, name: str, metric: Metric, clash: set[str], logged: set[str]) -> HarnessError:
    return HarnessError(
        f"metrics {other} and {name} both log {sorted(clash)}; a metric logs <name> and <name>_<suffix>, so "
        f"give one of them another name: {_rename_hint(name, metric, logged)}")


def check_metrics(metrics: dict[str, Any]) -> None:
    """Before any work: every metric is a :class:`~harness.evaluation.base.Metric`, and no two
    share a name (their scores would clash)."""
    seen: dict[str, str] = {}
    for name, metric in metrics.items():
        if not isinstance(metric, Metric):
            raise HarnessError(f"metric {name} is a {type(metric).__module__}.{type(metric).__qualname__}, not a "
                               "harness.evaluation.base.Metric: its _target_ must name a subclass of Metric")
        if metric.name in seen:
            raise _clash(seen[metric.name], name, metric, {metric.name}, set(seen))
        seen[metric.name] = name


def evaluate(metrics: dict[str, Metric], model: torch.nn.Module, x: torch.Tensor, maps: np.ndarray,
             targets: torch.Tensor, masks: np.ndarray | None,
             explain_fn: Any = None, regions: dict[str, np.ndarray] | None = None) -> dict[str, MetricOutput]:
    """Run every metric (``metrics`` maps option names to :class:`~harness.evaluation.base.Metric`
    objects). A metric that needs masks is skipped (with a warning) when none exist; one that
    re-explains inputs (``needs_explainer``) gets ``explain_fn(model, x, targets)``, one that reads
    named regions (``needs_regions``) gets ``regions``. A metric
    that fails is retried image by image: the images it fails on score NaN, and the reasons are
    kept in ``MetricOutput.errors``. Two metrics whose scores clash, or a metric whose scores or
    curves are not ``<name>`` or ``<name>_<suffix>``, stop the run with a :class:`HarnessError`."""
    from tqdm.auto import tqdm

    check_metrics(metrics)
    out = {}
    for name, metric in tqdm(metrics.items(), desc="metrics", disable=None if len(metrics) > 1 else True):
        if metric.needs_masks and masks is None:
            log.warning("metric %s needs ground-truth masks and this dataset has none: skipped", name)
            continue
        kwargs = {}
        if metric.needs_explainer:
            if explain_fn is None:
                raise HarnessError(f"metric {name} re-explains inputs and needs the explainer")
            kwargs["explain"] = explain_fn
        if metric.needs_regions:
            kwargs["regions"] = regions or {}
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
        res = out[name]
        if bad := sorted(k for k in (*res.scores, *res.curves) if not follows_naming_rule(metric.name, k)):
            raise HarnessError(f"metric {name} ({type(metric).__qualname__}, name={metric.name!r}) logs {bad}: "
                               f"a metric's scores and curves must be <name> or <name>_<suffix>")
        logged = {k for r in out.values() for k in (*r.scores, *r.curves)}
        for other, prev in list(out.items())[:-1]:
            if clash := (set(prev.scores) & set(res.scores)) | (set(prev.curves) & set(res.curves)):
                raise _clash(other, name, metric, clash, logged)
    return out


def score_info(metrics: dict[str, Metric], results: dict[str, MetricOutput]) -> dict[str, dict[str, Any]]:
    """For every logged score: the metric option that made it, its family and direction, for
    reports to sort and mark the best correctly."""
    return {score: {"metric": name, "family": metrics[name].family,
                    "higher_is_better": bool(r.higher_is_better.get(score, metrics[name].higher_is_better))}
            for name, r in results.items() for score in r.scores}
