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


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, read the sweep's runs from MLflow (tag
    ``sweep_id``), print the summary and write ``sweep_summary.json`` into the sweep folder."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from hydra.utils import instantiate

        sweep = Path(config.hydra.sweep.dir)
        jobs = [d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit()] if sweep.is_dir() else []
        skipped = sum((d / "skipped.json").exists() for d in jobs)
        tracker = instantiate(config.tracking)
        client = tracker.client()
        exp = client.get_experiment_by_name(tracker.experiment)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], filter_string=f"tags.sweep_id = '{config.hydra.sweep.dir}'", max_results=50000)
        s = summarise(runs, len(jobs), skipped)
        print(format_summary(s))
        if sweep.is_dir():
            (sweep / "sweep_summary.json").write_text(json.dumps(s, indent=1))
