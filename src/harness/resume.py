"""Resume, decided for a whole sweep before any heavy import.

A job is identified by the hash of its resolved config (tag ``config_hash``). When a sweep
starts, :func:`index_finished` asks the store once for the hashes of the experiment's FINISHED
runs and writes them to ``<sweep dir>/finished_configs.json``; each job then looks itself up in
that file (:func:`finished_in_sweep`) before torch, timm or mlflow are imported, and a finished
job costs only Hydra composing its config. A job not in the index (new, or finished by a
concurrent sweep since) goes on to :func:`harness.pipeline.run`, which asks the store again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness import utils

INDEX = "finished_configs.json"


def config_hash(cfg: Any) -> str:
    """SHA-256 of the resolved config (key order does not matter), in full."""
    return utils.config_hash(cfg, length=64)


def finished_runs(tracker: Any) -> dict[str, str]:
    """``{config_hash: run_id}`` of the FINISHED runs in the tracker's experiment (one query, paged)."""
    client = tracker.client()
    exp = client.get_experiment_by_name(tracker.experiment)
    out: dict[str, str] = {}
    token = None
    while exp is not None:
        page = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=5000, page_token=token)
        for r in page:
            if (h := r.data.tags.get("config_hash")) and h not in out:
                out[h] = r.info.run_id
        token = page.token
        if not token:
            break
    return out


def index_finished(tracker: Any, sweep_dir: str | Path) -> None:
    """Write the store's finished configs to the sweep folder (called once as a sweep starts)."""
    folder = Path(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(finished_runs(tracker)))
    tmp.replace(folder / INDEX)


def finished_in_sweep(cfg: Any, sweep_dir: str | Path) -> str | None:
    """The run id that already finished this job's config, per the sweep's index (None: not
    known to be finished, or no index)."""
    try:
        index = json.loads((Path(sweep_dir) / INDEX).read_text())
    except (OSError, ValueError):
        return None
    return index.get(config_hash(cfg))


def mark_skipped(run_id: str, output_dir: str | None) -> None:
    """Leave ``skipped.json`` in the job's Hydra output folder, for the sweep summary."""
    if output_dir is None:
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skipped.json").write_text(json.dumps({"finished_run": run_id}))
