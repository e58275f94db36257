"""The end-of-sweep summary: jobs done, skipped and failed, cache hits and time per stage.

Counted from the store: each launched job (a numbered folder of the sweep) is matched to its
run by the tags ``sweep_id`` and ``hydra_job_num``. A job is done when its run FINISHED or it
was skipped because its configuration had finished; every other job (its run FAILED, KILLED or
still RUNNING, or no run at all) is named in the summary, and the sweep exits with status 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from hydra.experimental.callback import Callback

from harness.tracking import snapshot
from harness.tracking.mlflow_tracker import run_summary

STAGES = ("predict", "explain", "concepts", "metrics", "language", "artifacts")  # concepts: xai=crp only


def job_status(jobs: dict[int, list[str]], skipped: set[int], runs: list[Any]) -> list[dict[str, Any]]:
    """Per launched job (``{number: overrides}``): its number, overrides, status (FINISHED,
    SKIPPED, FAILED, KILLED, RUNNING or NO_RUN) and run id and error where there is one."""
    latest: dict[int, Any] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        try:
            latest[int(r.data.tags.get("hydra_job_num", ""))] = r
        except ValueError:
            continue
    out = []
    for num, overrides in sorted(jobs.items()):
        run = latest.get(num)
        status = "SKIPPED" if num in skipped else run.info.status if run is not None else "NO_RUN"
        out.append({"job": num, "overrides": overrides, "status": status,
                    **({"run_id": run.info.run_id} if run is not None and num not in skipped else {}),
                    **({"error": run.data.tags["error"].splitlines()[0][:300]}
                       if run is not None and "error" in run.data.tags else {})})
    return out


def summarise(runs: list[Any], jobs: list[dict[str, Any]], n_skipped_before_launch: int,
              n_planned: int | None = None) -> dict[str, Any]:
    """Counts per status over a sweep's jobs (:func:`job_status`), and sums over its runs."""
    status: dict[str, int] = {}
    for j in jobs:
        status[j["status"]] = status.get(j["status"], 0) + 1
    n_jobs = len(jobs) + n_skipped_before_launch
    out: dict[str, Any] = {"jobs": n_jobs, "finished": status.get("FINISHED", 0),
                           "skipped": status.get("SKIPPED", 0) + n_skipped_before_launch,
                           "failed": status.get("FAILED", 0),
                           "killed_or_running": status.get("RUNNING", 0) + status.get("KILLED", 0),
                           "no_run": status.get("NO_RUN", 0),
                           "not_started": max(0, (n_planned or 0) - n_jobs),
                           "not_finished": [j for j in jobs if j["status"] not in ("FINISHED", "SKIPPED")],
                           "common_overrides": sorted(set.intersection(*(set(j["overrides"]) for j in jobs)))
                           if len(jobs) > 1 else []}
    sums: dict[str, float] = {}
    for r in runs:
        for k, v in run_summary(r).items():
            if k.startswith(("cache_hits_", "cache_misses_", "seconds_")) or k == "answer_cache_hits":
                sums[k] = sums.get(k, 0.0) + v
    out["cache"] = {k: v for k, v in sorted(sums.items()) if k.startswith(("cache_", "answer_"))}
    out["seconds"] = {s: round(sums.get(f"seconds_{s}", 0.0), 3) for s in STAGES
                      if s != "concepts" or f"seconds_{s}" in sums}
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"sweep: {s['jobs']} jobs: {s['finished']} finished, {s['skipped']} skipped (already finished), "
             f"{s['failed']} failed" + (f", {s['killed_or_running']} killed or still running" if s["killed_or_running"] else "")
             + (f", {s['no_run']} without a run" if s["no_run"] else "")
             + (f", {s['not_started']} never started" if s["not_started"] else "")]
    shared = set.intersection(*(set(j["overrides"]) for j in s["not_finished"])) if len(s["not_finished"]) > 1 else set()
    for j in s["not_finished"]:  # named by what sets it apart (the whole list for a lone job)
        swept = [o for o in j["overrides"] if o not in shared and o not in s.get("common_overrides", ())]
        lines.append(f"  job {j['job']} ({' '.join(swept)}): {j['status']}"
                     + (f" run {j['run_id']}" if "run_id" in j else "") + (f": {j['error']}" if "error" in j else ""))
    if s["cache"]:
        lines.append("cache: " + ", ".join(f"{k.replace('cache_', '')} {v:g}" for k, v in s["cache"].items()))
    lines.append("seconds per stage (sum over jobs): " + ", ".join(f"{k} {v:.1f}" for k, v in s["seconds"].items()))
    return "\n".join(lines)


def sweep_size(overrides: list[str], params: dict[str, str] | None = None) -> int | None:
    """Jobs a basic sweep over these command-line overrides and the config's
    ``hydra.sweeper.params`` (where the command line does not set the same key) launches (None
    if unknown)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        overrides = [*overrides, *(f"{k}={v}" for k, v in (params or {}).items() if k not in keys)]
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        n = 1
        for o in parsed:
            if o.is_sweep_override():
                n *= len(list(o.sweep_iterator()))
        return n
    except Exception:  # noqa: BLE001 - range/interval sweeps of other sweepers: no count
        return None


class SweepSummary(Callback):
    """Hydra callback: a progress line as each job of a sweep starts (``sweep: job k of n``, also
    from joblib and submitit workers: the count is read from the sweep folder), and at the end
    the summary read from the sweep's runs in MLflow (tag ``sweep_id``), printed and written to
    ``sweep_summary.json`` in the sweep folder."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        n = sweep_size(list(config.hydra.overrides.task), dict(config.hydra.sweeper.get("params") or {}))
        sweep = Path(config.hydra.sweep.dir)
        sweep.mkdir(parents=True, exist_ok=True)
        (sweep / "sweep_jobs.json").write_text(json.dumps({"jobs": n}))

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        import sys

        try:
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
            if str(hc.mode) != "RunMode.MULTIRUN":
                return
            n = json.loads((Path(hc.sweep.dir) / "sweep_jobs.json").read_text()).get("jobs")
        except (ValueError, OSError):
            return
        from harness.secrets import redact_overrides

        print(f"sweep: job {hc.job.num + 1} of {n or '?'} ({' '.join(redact_overrides(hc.overrides.task))})",
              file=sys.stderr)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from hydra.utils import instantiate

        sweep = Path(config.hydra.sweep.dir)
        folders = [d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit()] if sweep.is_dir() else []
        jobs = {int(d.name): _overrides(d) for d in folders}
        before_launch = json.loads((sweep / "skipped_jobs.json").read_text()) if (sweep / "skipped_jobs.json").exists() else []
        tracker = instantiate(config.tracking)
        saved = None if folders else snapshot.load(tracker)  # no job launched, nothing committed: no need to ask
        if saved is not None:
            experiment_id, runs = saved["experiment_id"], []
        else:
            client = tracker.client()
            exp = client.get_experiment_by_name(tracker.experiment)
            experiment_id = exp and exp.experiment_id
            runs = [] if exp is None else client.search_runs(
                [exp.experiment_id], filter_string=f"tags.sweep_id = '{config.hydra.sweep.dir}'", max_results=50000)
        planned = json.loads((sweep / "sweep_jobs.json").read_text()).get("jobs") if (sweep / "sweep_jobs.json").exists() else None
        status = job_status(jobs, {int(d.name) for d in folders if (d / "skipped.json").exists()}, runs)
        s = summarise(runs, status, len(before_launch), planned and planned + len(before_launch))
        print(format_summary(s))
        finished = [r for r in runs if r.info.status == "FINISHED"]
        skipped = [r for r in [j.get("finished_run") for j in before_launch] + [
            json.loads((d / "skipped.json").read_text()).get("finished_run")
            for d in folders if (d / "skipped.json").exists()] if r]
        if experiment_id is not None and (finished or skipped):
            print(compare_link(tracker, experiment_id, str(config.hydra.sweep.dir), finished, skipped,
                               next(iter(config.get("metrics") or {}), None), saved and saved["views"]))
        if saved is None:
            snapshot.save(tracker)  # what the next sweep would ask, while nothing is committed
        if sweep.is_dir():
            (sweep / "sweep_summary.json").write_text(json.dumps(s, indent=1))
        if s["not_finished"] or s["not_started"]:
            raise SystemExit(1)  # the sweep ran every job; scripts and CI see that some did not finish


def compare_link(tracker: Any, experiment_id: str, sweep_id: str, runs: list[Any], skipped: list[str],
                 first_score: str | None, views: list[str] | None = None) -> str:
    """Publish the sweep's runs table (its finished ``runs`` and the earlier runs of its
    ``skipped`` jobs) as a shared view of the MLflow UI (:mod:`harness.tracking.ui`) and say
    where to open it; a view of the same runs among the experiment's ``views`` is not written
    again."""
    from harness.tracking import ui

    ids = [r.info.run_id for r in runs] + skipped
    key = ui.view_key(ui.sweep_filter(sweep_id, ids))
    if key not in (views or ()):
        try:
            client = tracker.client()
            sample = runs[:50] + (client.search_runs([experiment_id], ui.sweep_filter(sweep_id, skipped[:50]),
                                                     max_results=50)
                                  if skipped else [])  # which columns: the options that vary, the scores (one query)
            key, state = ui.sweep_view(sample, ui.sweep_filter(sweep_id, ids), first_score)
            ui.publish_view(client, experiment_id, key, state)
        except Exception as e:  # noqa: BLE001 - the sweep's result stands without its view
            return f"compare in the MLflow UI: not available ({type(e).__name__}: {e})"
    hint = ui.how_to_open(tracker.uri)
    return f"compare in the MLflow UI{f' ({hint})' if hint else ''}: {ui.view_url(tracker.uri, experiment_id, key)}"


def _overrides(job_dir: Path) -> list[str]:
    """The job's overrides, from the ``.hydra/overrides.yaml`` Hydra writes as the job starts."""
    try:
        return [str(o) for o in (yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or [])]
    except (OSError, yaml.YAMLError):
        return []
