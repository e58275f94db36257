"""Exactly one run per configuration, whatever runs concurrently: claims, and dead runs reaped.

**Claims.** Before a job does any work it claims its configuration (the hash of its resolved
config) for its run. The one atomic operation every MLflow store offers, SQLite, PostgreSQL or
a server alike, is creating an experiment under a name no experiment has, deleted ones
included. A claim is such an experiment, ``harness-claim:<experiment id>:<config hash>:<n>``,
created with the claiming run's id as a tag and deleted at once (so the UI does not list it;
its name stays taken). Generation ``n + 1`` may be created only by a job that saw generation
``n`` released: its run has ended (FINISHED, FAILED or KILLED) or its process is dead. Two jobs
that both see ``n`` released both try ``n + 1`` and exactly one succeeds; a claim is never
deleted for good, so no job can see an older generation as the newest. A job that finds the
configuration held by a live run waits for that run to end: FINISHED, the job is done (it is
skipped and its sweep counts it so); FAILED or KILLED, it claims the next generation and runs
the configuration itself. Overlapping sweeps so share the work and never finish one
configuration twice.

**Reaping.** A run whose process is gone (killed, out of memory, node lost) stays RUNNING in
the store. When a sweep starts, :func:`reap` marks such runs KILLED, with the reason as a tag:
on the same host when their process (host, pid and start time, :mod:`harness.ownership`) no
longer exists, elsewhere when their heartbeat is older than ``stale_after_s``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from harness import ownership

log = logging.getLogger(__name__)

PREFIX = "harness-claim"
ENDED = ("FINISHED", "FAILED", "KILLED")


def _name(experiment_id: str, config_hash: str, generation: int) -> str:
    return f"{PREFIX}:{experiment_id}:{config_hash}:{generation}"


def _generations(client: Any, experiment_id: str, config_hash: str) -> dict[int, str]:
    """``{generation: run id}`` of the claims on this configuration."""
    from mlflow.entities import ViewType

    prefix = _name(experiment_id, config_hash, 0)[:-1]
    out = {}
    for e in client.search_experiments(view_type=ViewType.ALL, filter_string=f"name LIKE '{prefix}%'"):
        try:
            out[int(e.name.rsplit(":", 1)[1])] = e.tags.get("run_id", "")
        except ValueError:
            continue
    return out


def last_seen_ms(run: Any) -> int:
    """When the run was last known alive: its heartbeat tag, else its start (ms since epoch)."""
    try:
        return int(float(run.data.tags["heartbeat"]) * 1000)
    except (KeyError, ValueError):
        return int(run.info.start_time or 0)


def _live(client: Any, run_id: str, stale_after_s: float) -> Any:
    """The run if it is RUNNING in a live process, else None."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.status in ENDED or run.info.lifecycle_stage == "deleted":
        return None
    return run if ownership.run_alive(run.data.tags, last_seen_ms(run), stale_after_s) else None


def acquire(client: Any, experiment_id: str, config_hash: str, run_id: str, stale_after_s: float) -> Any:
    """Claim the configuration for ``run_id``: None when claimed, else the live run that holds it."""
    from mlflow.exceptions import MlflowException

    while True:
        claims = _generations(client, experiment_id, config_hash)
        n = max(claims, default=-1)
        if n >= 0 and claims[n] == run_id:
            return None  # this run's own claim
        if n >= 0 and (holder := _live(client, claims[n], stale_after_s)) is not None:
            return holder
        try:
            eid = client.create_experiment(_name(experiment_id, config_hash, n + 1), tags={"run_id": run_id})
        except MlflowException:  # another job took generation n + 1 first: look again
            continue
        client.delete_experiment(eid)
        return None


def claim(client: Any, experiment_id: str, config_hash: str, run_id: str, stale_after_s: float,
          poll_s: float = 2.0) -> str | None:
    """Claim the configuration for ``run_id``, waiting while a live run holds it. Returns the id
    of a run that finished it meanwhile (nothing left to do), or None (claimed: run it)."""
    announced = None
    while (holder := acquire(client, experiment_id, config_hash, run_id, stale_after_s)) is not None:
        if announced != holder.info.run_id:
            log.info("the same configuration runs as run %s (host %s, pid %s): waiting for it to end",
                     holder.info.run_id, holder.data.tags.get("owner.host", "?"), holder.data.tags.get("owner.pid", "?"))
            announced = holder.info.run_id
        while _live(client, holder.info.run_id, stale_after_s) is not None:
            time.sleep(poll_s)
    done = finished_run(client, experiment_id, config_hash, other_than=run_id)
    return None if done is None else done.info.run_id


def finished_run(client: Any, experiment_id: str, config_hash: str, other_than: str | None = None) -> Any:
    """A FINISHED run of the experiment with this config hash (not ``other_than``), or None."""
    filter_string = f"tags.config_hash = '{config_hash}' and attributes.status = 'FINISHED'"
    done = [r for r in client.search_runs([experiment_id], filter_string, max_results=2) if r.info.run_id != other_than]
    return done[0] if done else None


def reap(client: Any, experiment_id: str, stale_after_s: float) -> list[str]:
    """Mark the experiment's RUNNING runs whose process is gone KILLED; returns their ids."""
    reaped = []
    token = None
    while True:
        page = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000, page_token=token)
        for run in page:
            if not ownership.run_alive(run.data.tags, last_seen_ms(run), stale_after_s):
                where = run.data.tags.get("owner.host", "?"), run.data.tags.get("owner.pid", "?")
                client.set_tag(run.info.run_id, "killed_reason",
                               f"its process (host {where[0]}, pid {where[1]}) was gone when a sweep resumed")
                client.set_terminated(run.info.run_id, "KILLED")
                reaped.append(run.info.run_id)
        token = page.token
        if not token:
            break
    if reaped:
        log.info("marked %d run(s) whose process was gone KILLED", len(reaped))
    return reaped
