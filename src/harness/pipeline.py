"""One job: dataset -> classifier -> explainer -> metrics -> MLflow.

``run(cfg)`` is a plain function of the composed config; ``python -m harness`` only calls it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from harness.types import HarnessError, ImageSet, MetricOutput
from harness.utils import seed_everything, to_plain

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def hydra_context() -> dict[str, Any]:
    """What a job needs from Hydra's runtime, as plain data (so a job can also run in a child
    process): run tags, the option chosen for each group, and the job's output folder."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return {"tags": {}, "choices": {}, "output_dir": None}
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    choices = {group: str(option) for group, option in hc.runtime.choices.items()
               if "/" not in group and option is not None}
    return {
        "tags": {"sweep_id": hc.sweep.dir if multirun else hc.run.dir,
                 "hydra_job_num": str(hc.job.num) if multirun else "0",
                 "hydra_overrides": " ".join(hc.overrides.task),
                 **{f"choice.{group}": option for group, option in choices.items()}},
        "choices": choices,
        "output_dir": str(hc.runtime.output_dir),
    }


def build(node: Any) -> Any:
    """``hydra.utils.instantiate``, but a :class:`HarnessError` raised by the component comes
    out as itself (Hydra wraps it), so the user sees its message alone."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, HarnessError):
            raise e.__cause__ from None
        raise


def _check_capabilities(explainer: Any, model: torch.nn.Module) -> None:
    """Refuse a method the model cannot serve before any work is done."""
    from harness.xai.base import is_vit, methods_for

    name = type(explainer).__name__
    if getattr(explainer, "needs_gradients", False) and not any(p.requires_grad for p in model.parameters()):
        raise HarnessError(f"{name} needs gradients, but the model has none "
                           "(int8 or TorchScript model?); choose a gradient-free xai option")
    arch = "vit" if is_vit(model) else "cnn"
    if arch not in getattr(explainer, "architectures", (arch,)):
        raise HarnessError(f"{name} does not serve this model ({type(getattr(model, 'net', model)).__name__}, "
                           f"a {arch.upper()}); xai options that do: {', '.join(methods_for(arch))}")


def _mark_skipped(run_id: str, output_dir: str | None) -> None:
    """Leave ``skipped.json`` in the job's Hydra output folder, for the sweep summary."""
    import json

    if output_dir is None:
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skipped.json").write_text(json.dumps({"finished_run": run_id}))


def _finished_run(tracker: Any, config_hash: str) -> Any:
    """A FINISHED run of the tracker's experiment with this config hash, or None."""
    client = tracker.client()
    exp = client.get_experiment_by_name(tracker.experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], max_results=1, filter_string=(
        f"tags.config_hash = '{config_hash}' and attributes.status = 'FINISHED'"))
    return runs[0] if runs else None


def _aggregate(per_image: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
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


def explain(explainer: Any, model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor,
            batch_size: int, progress: bool = True) -> np.ndarray:
    """Attribution maps ``[N, H, W]`` for ``x``, computed ``batch_size`` images at a time."""
    from tqdm.auto import tqdm

    maps = []
    for i in tqdm(range(0, len(x), batch_size), desc=f"explain ({type(explainer).__name__})",
                  disable=None if progress else True):
        maps.append(np.asarray(explainer(model, x[i : i + batch_size], targets[i : i + batch_size])))
    out = np.concatenate(maps) if maps else np.zeros((0, *x.shape[-2:]), np.float32)
    if out.shape != (len(x), *x.shape[-2:]):
        raise RuntimeError(f"{type(explainer).__name__} returned maps of shape {out.shape}, "
                           f"expected {(len(x), *x.shape[-2:])}")
    return out.astype(np.float32)


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


def run(cfg: DictConfig, context: dict[str, Any] | None = None) -> dict[str, float]:
    """Run one job described by ``cfg`` and return its aggregate metrics. ``context`` is
    :func:`hydra_context` (taken from Hydra's runtime when not given)."""
    from harness.tracking.mlflow_tracker import flatten, git_commit, package_versions

    context = hydra_context() if context is None else context
    t_start = time.perf_counter()
    if cfg.target not in ("label", "predicted"):
        raise HarnessError(f"target={cfg.target!r} is not valid; valid: label, predicted")
    from harness.cache import digest

    tracker = build(cfg.tracking)
    config_hash = digest(to_plain(cfg))
    if cfg.get("resume", False) and (done := _finished_run(tracker, config_hash)) is not None:
        log.info("job already finished as run %s (same resolved config): skipped; resume=false runs it again",
                 done.info.run_id)
        _mark_skipped(done.info.run_id, context["output_dir"])
        return {**done.data.metrics, "skipped": 1.0}
    tags = {**context["tags"], **package_versions(), **git_commit(PROJECT_ROOT), "seed": str(cfg.seed),
            "config_hash": config_hash}
    with tracker.start_run(cfg.run_name, tags=tags) as rec:
        rec.params(flatten(to_plain(cfg)))
        rec.text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        seed_everything(cfg.seed)

        # The cheap parts first, so a bad prompt or metric setting stops the job before data and model load.
        explainer = build(cfg.xai)
        metrics = {name: build(m) for name, m in (cfg.get("metrics") or {}).items()}
        language = None if cfg.get("mllm") is None else (
            build(cfg.render), build(cfg.prompt), build(cfg.mllm),
            {name: build(m) for name, m in (cfg.get("text_metrics") or {}).items()})
        data: ImageSet = build(cfg.dataset)
        if len(data) == 0:
            raise HarnessError("the dataset yielded no images" +
                               (f" ({len(data.skipped)} skipped as unreadable)" if data.skipped else ""))
        model = build(cfg.model)
        _check_capabilities(explainer, model)

        x, masks = model.preprocess(data.images, data.masks)
        if not data.has_masks:
            masks = None
        labels = torch.from_numpy(data.labels)
        from harness.cache import StageCache, digest, model_digest

        cache = StageCache(cfg.cache.dir)
        t_stage = time.perf_counter()
        device = str(getattr(model, "mean", torch.zeros(0)).device.type)
        pred_key = digest("predictions", x, labels.numpy(), list(data.ids), model_digest(model), device)
        if (hit := cache.get("predictions", pred_key)) is not None:
            logits = torch.from_numpy(hit["logits"])
        else:
            logits = model.predict(x)
            cache.put("predictions", pred_key, {"logits": logits.numpy()})
        predict_s = time.perf_counter() - t_stage
        if logits.shape[1] != len(data.class_names):
            log.warning("model has %d outputs but the dataset names %d classes",
                        logits.shape[1], len(data.class_names))
        preds = logits.argmax(1)
        targets = labels if cfg.target == "label" else preds

        attr_key = digest("attributions", pred_key, to_plain(cfg.xai), targets.numpy(), int(cfg.seed))
        t0 = time.perf_counter()
        if (hit := cache.get("attributions", attr_key)) is not None:
            maps = hit["maps"]
        else:
            maps = explain(explainer, model, x, targets, int(cfg.batch_size))
            cache.put("attributions", attr_key, {"maps": maps})
        explain_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = evaluate(metrics, model, x, maps, targets, masks, explain_fn=lambda m, xx, tt: explain(
            explainer, m, xx, tt, int(cfg.batch_size), progress=False))

        metrics_s = time.perf_counter() - t0
        per_image = {k: v for r in results.values() for k, v in r.scores.items()}
        summary = {
            "accuracy": float((preds == labels).float().mean()),
            "n_images": float(len(data)),
            "n_skipped": float(len(data.skipped)),
            "explain_seconds_per_image": explain_s / len(data),  # a cache hit: the time to load the maps
            **cache.counts(),
            "n_metric_errors": float(sum(len(r.errors) for r in results.values())),
            **{f"model_{k}": v for k, v in model.info.items()},
            **_aggregate(per_image),
        }
        t0 = time.perf_counter()
        records, text_scores, text_info = (language_stage(cfg, language, data, x, maps, preds, logits, masks, rec,
                                                          context["choices"])
                                           if language else ([], {}, {}))
        if records:
            from harness.mllm.stage import summary as language_summary

            summary.update(language_summary(records, cfg.prompt.get("response_format") == "json"))
            summary.update(_aggregate(text_scores))
        summary.update(seconds_predict=predict_s, seconds_explain=explain_s, seconds_metrics=metrics_s,
                       seconds_language=time.perf_counter() - t0)
        info = {**score_info(metrics, results), **text_info}
        rec.tags({f"{k}.{score}": str(v).lower() for score, i in info.items()
                  for k, v in i.items() if k != "metric"})
        _log_outputs(rec, cfg, data, x, maps, labels, preds, targets, per_image, results, info)
        summary["wall_seconds"] = time.perf_counter() - t_start
        rec.metrics(summary)
        log.info("run %s: %s", rec.run_id, ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    return summary


def language_stage(cfg: DictConfig, language: tuple[Any, Any, Any, dict[str, Any]], data: ImageSet,
                   x: torch.Tensor, maps: np.ndarray, preds: torch.Tensor, logits: torch.Tensor, masks: Any,
                   rec: Any, choices: dict[str, str] | None = None,
                   ) -> tuple[list, dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Render the first ``language.n_images`` explanations with the ``(renderer, prompt, mllm,
    text_metrics)`` of ``language``, ask the MLLM about each, score the answers, and log the
    rendered images (``rendered/``) and the answers with their scores (table ``answers.json``,
    ``answers.jsonl``). Returns the records, the text scores (one value per record) and their
    metadata."""
    import json
    from dataclasses import asdict

    import pandas as pd

    from harness.mllm.base import Request
    from harness.mllm.stage import AnswerCache, ask

    from PIL import Image

    from harness.text.base import Context

    renderer, prompt, mllm, text_metrics = language
    n = len(data) if cfg.language.n_images is None else min(len(data), int(cfg.language.n_images))
    names = data.class_names
    probs = logits.softmax(1)
    choices = choices or {}
    method = str(cfg.language.method_name or choices.get("xai", str(cfg.xai._target_).rsplit(".", 1)[-1]))
    classifier = choices.get("model", str(cfg.model._target_).rsplit(".", 1)[-1])
    requests, files = [], []
    with rec.folder("rendered") as tmp:
        for i in range(n):
            p = int(preds[i])
            label = names[p] if 0 <= p < len(names) else str(p)
            true = names[int(data.labels[i])] if 0 <= int(data.labels[i]) < len(names) else str(data.labels[i])
            score = float(probs[i, p]) * 100
            system, user = prompt.render(label=label, true_label=true, score=f"{score:.0f}", method=method,
                                         classifier=classifier)
            images = renderer(x[i].numpy().transpose(1, 2, 0), maps[i])
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in data.ids[i])
            files.append([f"rendered/{i:05d}_{safe}_{j}.png" for j in range(len(images))])
            for img, f in zip(images, files[-1]):
                img.save(tmp / Path(f).name)
            requests.append(Request(images, user, system, maps[i], label, score,
                                    None if masks is None else masks[i]))
    cache = AnswerCache(cfg.language.cache_dir)
    records = ask(mllm, requests, data.ids[:n], cache, files, prompt.response_format == "json")
    contexts = {data.ids[i]: Context(requests[i].label, list(names), maps[i], requests[i].mask,
                                     Image.fromarray((x[i].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)))
                for i in range(n)}
    scores: dict[str, np.ndarray] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, metric in text_metrics.items():
        out = metric(records, contexts)
        for k, v in out.items():
            info[k] = {"metric": name, "family": metric.family, "higher_is_better": bool(metric.directions.get(k, True))}
        scores.update(out)
    rows = [{**asdict(r), **{k: float(v[j]) for k, v in scores.items()}} for j, r in enumerate(records)]
    rec.text("\n".join(json.dumps(r, default=str) for r in rows) + "\n", "answers.jsonl")
    table = pd.DataFrame([{**r, "decoding": json.dumps(r["decoding"]), "rendered": " ".join(r["rendered"]),
                           "parsed": json.dumps(r["parsed"]) if r["parsed"] is not None else ""} for r in rows])
    rec.table(table, "answers.json")
    return records, scores, info


def _log_outputs(rec, cfg, data: ImageSet, x: torch.Tensor, maps: np.ndarray, labels, preds, targets,
                 per_image: dict[str, np.ndarray], results: dict[str, MetricOutput],
                 info: dict[str, dict[str, Any]]) -> None:
    import json

    import pandas as pd

    from harness.render.curves import plot_curves
    from harness.render.overlay import overlay

    names = data.class_names
    name_of = lambda i: names[i] if 0 <= i < len(names) else str(i)  # noqa: E731
    table = pd.DataFrame({
        "image_id": data.ids,
        "label": labels.numpy(),
        "label_name": [name_of(int(i)) for i in labels],
        "prediction": preds.numpy(),
        "prediction_name": [name_of(int(i)) for i in preds],
        "target": targets.numpy(),
        "correct": (preds == labels).numpy(),
        **per_image,
    })
    rec.table(table, "per_image.json")
    if data.skipped:
        rec.text("\n".join(f"{i}\t{why}" for i, why in data.skipped), "skipped.tsv")
    if info:
        rec.text(json.dumps(info, indent=1), "metric_info.json")
    if errors := [(data.ids[i], name, why) for name, r in results.items() for i, why in r.errors]:
        rec.text("image_id\tmetric\treason\n" + "\n".join("\t".join(e) for e in errors), "metric_errors.tsv")
    with rec.folder() as tmp:
        np.savez_compressed(tmp / "attributions.npz", attributions=maps, image_ids=np.array(data.ids),
                            labels=labels.numpy(), predictions=preds.numpy(), targets=targets.numpy(),
                            inputs=(x.numpy().transpose(0, 2, 3, 1) * 255).round().astype(np.uint8),
                            class_names=np.array(names))
        curves = {k: v for r in results.values() for k, v in r.curves.items()}
        curves.update({f"{name}_x": r.curve_x for name, r in results.items() if r.curve_x is not None})
        if curves:
            np.savez_compressed(tmp / "curves.npz", **curves)
            plot_curves(results, tmp / "curves.png", title=str(cfg.xai._target_).rsplit(".", 1)[-1])
    limit = len(data) if cfg.max_overlays is None else min(len(data), int(cfg.max_overlays))
    if limit:
        with rec.folder("overlays") as tmp:
            for i in range(limit):
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in data.ids[i])
                overlay(x[i].numpy(), maps[i]).save(tmp / f"{i:05d}_{safe}.png")
