"""One job: dataset -> classifier -> explainer -> metrics -> language -> MLflow.

``run(cfg)`` is a plain function of the composed config; ``python -m harness`` only calls it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness import resume
from harness.cache import StageCache
from harness.components import build, build_components
from harness.evaluation.stage import aggregate, evaluate, score_info
from harness.mllm.stage import image_hosts, language_stage
from harness.mllm.stage import summary as language_summary
from harness.secrets import redacted_config
from harness.models.stage import check_target, model_inputs, predictions
from harness.tracking.artifacts import log_artifacts
from harness.tracking.mlflow_tracker import flatten, run_summary
from harness.utils import rng_restored, seed_everything, to_plain
from harness.xai.stage import attributions, explain

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def hydra_context() -> dict[str, Any]:
    """What a job needs from Hydra's runtime, as plain data (so a job can also run in a child
    process): run tags, the option chosen for each group, and the job's output folder."""
    from harness.secrets import redact_overrides

    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return {"tags": {}, "choices": {}, "output_dir": None}
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    choices = {group: str(option) for group, option in hc.runtime.choices.items()  # with nested groups
               if not group.startswith("hydra/") and "@" not in group and option is not None}  # (xai/denoiser)
    return {
        "tags": {"sweep_id": hc.sweep.dir if multirun else hc.run.dir,
                 "hydra_job_num": str(hc.job.num) if multirun else "0",
                 "hydra_overrides": " ".join(redact_overrides(hc.overrides.task)),
                 **{f"choice.{group}": option for group, option in choices.items()}},
        "choices": choices,
        "output_dir": str(hc.runtime.output_dir),
    }


def _finished_run(tracker: Any, config_hash: str) -> Any:
    """A FINISHED run of the tracker's experiment with this config hash, or None."""
    from harness.tracking.claims import finished_run

    exp = tracker.client().get_experiment_by_name(tracker.experiment)
    return None if exp is None else finished_run(tracker.client(), exp.experiment_id, config_hash)


def run(cfg: DictConfig, context: dict[str, Any] | None = None) -> dict[str, float]:
    """Run one job described by ``cfg`` and return its aggregate metrics. ``context`` is
    :func:`hydra_context` (taken from Hydra's runtime when not given)."""
    context = hydra_context() if context is None else context
    t_start = time.perf_counter()
    cfg, _ = redacted_config(cfg)  # credentials are neither used nor stored (harness.secrets)
    check_target(cfg.target)
    tracker = build(cfg.tracking)
    config_hash = resume.config_hash(cfg)
    if cfg.get("resume", False) and (done := _finished_run(tracker, config_hash)) is not None:
        log.info("job already finished as run %s (same resolved config): skipped; resume=false runs it again",
                 done.info.run_id)
        resume.mark_skipped(done.info.run_id, context["output_dir"])
        return {**run_summary(done), "skipped": 1.0}
    # the job seeds the global RNGs (below) for itself only: the caller's states come back when it ends
    with rng_restored(), tracker.start_run(cfg.run_name, tags=_run_tags(cfg, context, config_hash)) as rec:
        if cfg.get("resume", False) and (done_id := rec.claim(config_hash)) is not None:
            log.info("job finished meanwhile as run %s (same resolved config): skipped", done_id)
            rec.discard()  # this run did nothing: deleted, the claim protocol's loser
            resume.mark_skipped(done_id, context["output_dir"])
            return {**run_summary(tracker.client().get_run(done_id)), "skipped": 1.0}
        rec.params(flatten(to_plain(cfg)))
        rec.text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        seed_everything(cfg.seed)
        c = build_components(cfg)
        private = bool(cfg.privacy.enabled)  # checked against the MLLM endpoints by build_components
        if c.language is not None and (hosts := image_hosts(c.language)):
            rec.tags({"images_sent_to": ",".join(sorted(set(hosts.values())))})
        cache, seconds = StageCache(cfg.cache.dir), Seconds()
        inputs = model_inputs(c.model, c.data)
        with seconds("predict"):
            pred = predictions(c.model, c.data, inputs, cache, cfg.target)
        rec.tags({"model_digest": pred.model_digest})  # which weights, exactly: compare runs and checkpoints
        with seconds("explain"):
            maps = attributions(c.explainer, c.model, inputs.x, pred.targets, cache, predictions_key=pred.key,
                                config=to_plain(cfg.xai), seed=cfg.seed, batch_size=int(cfg.batch_size))
        concepts = None
        if hasattr(c.explainer, "concepts"):  # concept-level XAI: atlas, faithfulness, prototypes
            from harness.xai.concept_stage import concept_stage

            n_lang = 0 if c.language is None else len(c.data) if cfg.language.n_images is None else cfg.language.n_images
            n_fig = 8 if cfg.max_overlays is None else int(cfg.max_overlays)
            with seconds("concepts"):
                concepts = concept_stage(
                    c.explainer, c.model, inputs.x, pred.targets, pred.preds, cache, predictions_key=pred.key,
                    model_key=pred.model_digest, config=to_plain(cfg.xai), seed=cfg.seed,
                    batch_size=int(cfg.batch_size), n_views=max(int(n_lang), n_fig))
        revealed = None
        if c.reveal is not None:  # reveal=spray: cluster the maps per class (harness.revise.reveal)
            with seconds("reveal"):
                features = {"maps": maps} | ({"concepts": concepts.relevance} if concepts is not None else {})
                revealed = c.reveal(features, pred.targets.numpy(), inputs.regions, list(c.data.ids))
        with seconds("metrics"):
            results = evaluate(c.metrics, c.model, inputs.x, maps, pred.targets, inputs.masks, regions=inputs.regions,
                               explain_fn=lambda m, xx, tt: explain(c.explainer, m, xx, tt, int(cfg.batch_size),
                                                                    progress=False))
        with seconds("language"):
            records, text_scores, text_info = ([], {}, {}) if c.language is None else language_stage(
                c.language, c.data, inputs.x, maps, pred.preds, pred.logits, inputs.masks, rec,
                n_images=cfg.language.n_images, cache_dir=cfg.language.cache_dir, private=private,
                concepts=None if concepts is None else concepts.views,
                **_prompt_names(cfg, context["choices"]))
        per_image = {k: v for r in results.values() for k, v in r.scores.items()} | (concepts.scores if concepts else {})
        info = {**score_info(c.metrics, results), **text_info}
        rec.tags({f"{k}.{score}": str(v).lower() for score, i in info.items() for k, v in i.items() if k != "metric"})
        with seconds("artifacts"):
            log_artifacts(rec, c.data, inputs.x, maps, inputs.labels, pred.preds, pred.targets, per_image, results,
                          info, title=str(cfg.xai._target_).rsplit(".", 1)[-1], max_overlays=cfg.max_overlays,
                          private=private)
            if concepts is not None:
                from harness.xai.concept_stage import log_concepts

                log_concepts(rec, concepts, inputs.x, list(c.data.ids), private=private, n_figures=n_fig,
                             class_names=(c.explainer.reference or c.data).class_names)
            if revealed is not None:
                from harness.revise.reveal import log_reveal

                log_reveal(rec, revealed, list(c.data.class_names))
        scores = aggregate(per_image) | aggregate(text_scores)
        intervals = {k: scores.pop(k) for k in list(scores) if k.endswith(("_ci95_low", "_ci95_high"))}
        headline_scores = {  # the science, mean and sem: what a sweep's runs are compared by in the UI
            "accuracy": float((pred.preds == inputs.labels).float().mean()),
            **scores,
            **(concepts.summary if concepts is not None else {}),
            **(revealed.summary if revealed is not None else {}),
        }
        diagnostics = {
            "n_images": float(len(c.data)),
            "n_skipped": float(len(c.data.skipped)),
            "explain_seconds_per_image": seconds["explain"] / len(c.data),  # a cache hit: the time to load the maps
            **cache.counts(),
            "n_metric_errors": float(sum(len(r.errors) for r in results.values())),
            **{f"model_{k}": v for k, v in c.model.info.items()},
            **{f"denoiser_{k}": v for k, v in getattr(getattr(c.explainer, "denoiser", None), "info", {}).items()},
            **(language_summary(records, cfg.prompt.get("response_format") == "json") if records else {}),
            **{f"seconds_{k}": v for k, v in seconds.items()},
            "wall_seconds": time.perf_counter() - t_start,
        }
        rec.summary(headline_scores, intervals | diagnostics)
        summary = headline_scores | intervals | diagnostics
        log.info("%s", headline(rec.run_id, tracker, summary, per_image, info))
    return summary


def headline(run_id: str, tracker: Any, summary: dict[str, float], per_image: dict[str, Any],
             info: dict[str, dict[str, Any]]) -> str:
    """What a person reads at the end of a job: where the run is, accuracy, and each score as
    mean ± standard error with its direction."""
    scores = [f"{k} {summary[k]:.3g} ± {summary.get(f'{k}_sem', 0.0):.2g}"
              + ("" if k not in info else " (higher is better)" if info[k]["higher_is_better"] else " (lower is better)")
              for k in per_image if k in summary]
    return (f"run {run_id} in experiment {tracker.experiment!r} at {tracker.uri}: accuracy {summary['accuracy']:.3g} "
            f"on {summary['n_images']:g} images, {summary['wall_seconds']:.1f} s" + ("; " if scores else "") + "; ".join(scores))


class Seconds(dict):
    """Wall seconds per stage: ``with seconds("explain"): ...`` adds the block's time, and logs
    the stage's start and end (progress in the job's log, whether or not output is a terminal)."""

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        log.info("stage %s ...", stage)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self[stage] = self.get(stage, 0.0) + dt
            log.info("stage %s: %.2f s", stage, dt)


def _run_tags(cfg: DictConfig, context: dict[str, Any], config_hash: str) -> dict[str, str]:
    from harness.tracking.mlflow_tracker import git_commit, package_versions

    return {**context["tags"], **package_versions(), **git_commit(PROJECT_ROOT), "seed": str(cfg.seed),
            "config_hash": config_hash}


def _prompt_names(cfg: DictConfig, choices: dict[str, str]) -> dict[str, str]:
    """How ``{method}`` and ``{classifier}`` read in prompts: the chosen options' names."""
    return {"method": str(cfg.language.method_name or choices.get("xai", str(cfg.xai._target_).rsplit(".", 1)[-1])),
            "classifier": choices.get("model", str(cfg.model._target_).rsplit(".", 1)[-1])}
