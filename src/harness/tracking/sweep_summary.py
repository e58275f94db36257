"""The end-of-sweep summary: jobs done, skipped and failed, cache hits and time per stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

STAGES = ("predict", "explain", "metrics", "language")


def summarise(runs: list[Any], n_jobs: int, n_skipped: int) -> dict[str, Any]:
    """Counts and sums over a sweep's MLflow runs."""
    status: dict[str, int] = {}
    for r in runs:
        status[r.info.status] = status.get(r.info.status, 0) + 1
    out: dict[str, Any] = {"jobs": n_jobs, "finished": status.get("FINISHED", 0), "skipped": n_skipped,
                           "failed": status.get("FAILED", 0), "killed_or_running": status.get("RUNNING", 0)
                           + status.get("KILLED", 0)}
    sums: dict[str, float] = {}
    for r in runs:
        for k, v in r.data.metrics.items():
            if k.startswith(("cache_hits_", "cache_misses_", "seconds_")) or k == "answer_cache_hits":
                sums[k] = sums.get(k, 0.0) + v
    out["cache"] = {k: v for k, v in sorted(sums.items()) if k.startswith(("cache_", "answer_"))}
    out["seconds"] = {s: round(sums.get(f"seconds_{s}", 0.0), 3) for s in STAGES}
    return out


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"sweep: {s['jobs']} jobs: {s['finished']} finished, {s['skipped']} skipped (already finished), "
             f"{s['failed']} failed" + (f", {s['killed_or_running']} killed or still running" if s["killed_or_running"] else "")]
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
        print(f"sweep: job {hc.job.num + 1} of {n or '?'} ({' '.join(hc.overrides.task)})", file=sys.stderr)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from hydra.utils import instantiate

        sweep = Path(config.hydra.sweep.dir)
        jobs = [d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit()] if sweep.is_dir() else []
        before_launch = json.loads((sweep / "skipped_jobs.json").read_text()) if (sweep / "skipped_jobs.json").exists() else []
        skipped = sum((d / "skipped.json").exists() for d in jobs) + len(before_launch)
        tracker = instantiate(config.tracking)
        client = tracker.client()
        exp = client.get_experiment_by_name(tracker.experiment)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], filter_string=f"tags.sweep_id = '{config.hydra.sweep.dir}'", max_results=50000)
        s = summarise(runs, len(jobs) + len(before_launch), skipped)
        print(format_summary(s))
        if sweep.is_dir():
            (sweep / "sweep_summary.json").write_text(json.dumps(s, indent=1))
