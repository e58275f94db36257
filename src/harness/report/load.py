"""A finished sweep as tables: one row per run, with its option choices and summary metrics, and
its artifacts on demand. Works the same on the embedded store and on an MLflow server."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.types import HarnessError
from harness.tracking.mlflow_tracker import run_summary

log = logging.getLogger(__name__)

# Option groups recorded as ``choice.<group>`` tags by every job (harness.pipeline.hydra_context).
GROUPS = ("xai", "model", "dataset", "mllm", "prompt", "render")


@dataclass
class Sweep:
    """The runs of one or more MLflow experiments.

    ``runs`` has one row per job run: ``run_id``, ``experiment``, ``run_name``, ``start_time``,
    one column per option group (``xai``, ``model``, ``dataset``, ``mllm``, ``prompt``,
    ``render``; ``mllm`` is ``none`` when the run had no language stage), ``variant`` (the
    values swept beyond the options, e.g. ``seed=1``; empty when none) and one column per
    summary metric. ``summaries`` holds the sensitivity summary runs (tag ``kind=summary``).
    ``info`` maps each score to its ``family`` and ``higher_is_better`` (from the runs' tags).
    """

    client: Any
    runs: pd.DataFrame
    summaries: pd.DataFrame
    info: dict[str, dict[str, Any]]
    cache: Path
    _files: dict[tuple[str, str], Path | None] = field(default_factory=dict)

    def artifact(self, run_id: str, path: str) -> Path | None:
        """The run's artifact ``path`` as a local file (downloaded once), or None when the run
        has no such artifact."""
        key = (run_id, path)
        if key not in self._files:
            try:
                self._files[key] = Path(self.client.download_artifacts(run_id, path, str(self.cache / run_id)))
            except Exception as e:  # noqa: BLE001 - MLflow raises several types for a missing file
                log.debug("run %s has no artifact %s: %s", run_id, path, e)
                self._files[key] = None
        return self._files[key]

    def npz(self, run_id: str, path: str) -> dict[str, np.ndarray] | None:
        f = self.artifact(run_id, path)
        if f is None:
            return None
        with np.load(f) as z:
            return {k: z[k] for k in z.files}

    def answers(self, run_id: str) -> list[dict[str, Any]]:
        f = self.artifact(run_id, "answers.jsonl")
        return [] if f is None else [json.loads(line) for line in f.read_text().splitlines() if line.strip()]

    def scores(self, families: list[str] | None = None) -> list[str]:
        """Scores of the given families (all when None) that some run has, in a stable order."""
        return [s for s, i in self.info.items() if (families is None or i["family"] in families)
                and s in self.runs.columns and self.runs[s].notna().any()]


def _search(client, experiment_ids: list[str], filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# Params that never make two runs' results different (bookkeeping, which scores were computed).
IGNORE = ("run_name", "experiment_name", "tracking.", "paths.", "cache.", "language.cache_dir", "metrics.",
          "text_metrics.", "max_overlays", "batch_size", "isolation", "resume")


def variants(params: pd.DataFrame, choices: pd.DataFrame, ignore: tuple[str, ...] = IGNORE) -> pd.Series:
    """A label per run for the values a sweep varied beyond the option choices, e.g.
    ``model.train_data.spurious_prob=1.0``: the params (not in ``ignore``) that differ between
    runs with the same choices. Empty when there are none."""
    keep = [c for c in params.columns if not c.startswith(ignore)]
    params = params[keep].fillna("∅").astype(str)
    varying = sorted({c for _, idx in choices.groupby(list(choices.columns), dropna=False).groups.items()
                      for c in keep if params.loc[idx, c].nunique() > 1})
    return params[varying].apply(lambda r: ", ".join(f"{k}={v}" for k, v in r.items()), axis=1) if varying \
        else pd.Series("", index=params.index)


def load(client, experiments: list[str], filter_string: str | None = None, cache: str | Path = ".",
         status: str = "FINISHED", ignore: tuple[str, ...] = IGNORE) -> Sweep:
    """Read the job runs of ``experiments`` (names) whose status is ``status`` and that match the
    MLflow ``filter_string`` (e.g. ``tags.`choice.model` = 'vit_tiny_shapes'``), and their
    sensitivity summary runs (unfiltered). Each run's ``variant`` names the values its sweep
    varied beyond the option choices (see :func:`variants`)."""
    exps = []
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments())
            raise HarnessError(f"experiment {name!r} not found in the tracking store; experiments there: "
                               f"{', '.join(known) or 'none'}")
        exps.append(exp)
    names = {e.experiment_id: e.name for e in exps}
    done = f"attributes.status = '{status}'"
    base = lambda run: {"run_id": run.info.run_id, "experiment": names[run.info.experiment_id],  # noqa: E731
                        "run_name": run.info.run_name, "start_time": run.info.start_time}
    summaries = [{**base(run), "source_experiment": run.data.tags.get("source_experiment"),
                  "verdict": run.data.tags.get("verdict"), "embedding": run.data.tags.get("embedding"),
                  **run_summary(run)}
                 for run in _search(client, list(names), f"{done} and tags.kind = 'summary'")]
    rows, params, info = [], [], {}
    for run in _search(client, list(names), done + (f" and {filter_string}" if filter_string else "")):
        tags = run.data.tags
        if "kind" in tags or "choice.xai" not in tags:  # summaries, reports, benchmarks, foreign runs
            continue
        rows.append({**base(run), **{g: tags.get(f"choice.{g}", "none") for g in GROUPS}, **run_summary(run)})
        params.append(run.data.params)
        for key, value in tags.items():
            prefix, _, score = key.partition(".")
            if prefix in ("family", "higher_is_better"):
                info.setdefault(score, {})[prefix] = value if prefix == "family" else value == "true"
    if not rows:
        raise HarnessError(f"no {status.lower()} job runs in experiment(s) {', '.join(experiments)}"
                           + (f" matching {filter_string!r}" if filter_string else ""))
    runs = pd.DataFrame(rows)
    runs.insert(len(GROUPS) + 4, "variant", variants(pd.DataFrame(params), runs[list(GROUPS)], tuple(ignore)))
    runs = runs.sort_values("start_time", kind="stable").reset_index(drop=True)
    info = {s: {"family": i.get("family", "other"), "higher_is_better": i.get("higher_is_better", True)}
            for s, i in sorted(info.items())}
    return Sweep(client, runs, pd.DataFrame(summaries), info, Path(cache))


def newest(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One run per combination of ``keys``: the newest. Runs that differ only outside ``keys``
    (a repeated job; other MLLMs or prompts over the same attributions) collapse to one."""
    return runs.sort_values("start_time", kind="stable").groupby(keys, dropna=False, sort=False).tail(1)


def order_methods(methods: list[str], order: list[str] | None = None) -> list[str]:
    """``order`` first (those present), then the rest alphabetically with ``random`` first."""
    order = [m for m in (order or []) if m in methods]
    rest = sorted(set(methods) - set(order), key=lambda m: (m != "random", m))
    return order + rest
