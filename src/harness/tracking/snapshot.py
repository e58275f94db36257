"""What a sweep asks a local SQLite store, saved beside it while nothing is committed to it.

A sweep asks the store three things that do not need a job: whether any run of its experiment
is still RUNNING (to reap dead ones, :func:`harness.tracking.claims.reap`), which configs
FINISHED (to skip them, :mod:`harness.resume`), and at its end whether the runs-table view it
links to exists (:mod:`harness.tracking.ui`). The answers are saved at the end of each sweep
with the store file's *change counter*, the 4-byte number at offset 24 of a SQLite file that
every committed transaction increments (https://www.sqlite.org/fileformat.html, "File change
counter"). While the counter (and the file) is the same, nothing was committed, and the next
sweep reads the saved answers instead of importing MLflow and opening the store (about 2.5 s,
most of what re-running a finished sweep costs). A file in WAL mode does not keep the counter,
and a store that is not a SQLite file is always asked.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

FORMAT = 1


def change_counter(db: Path) -> list[int] | None:
    """``[inode, size, change counter]`` of a rollback-journal SQLite file with no transaction
    under way; None otherwise (no such file, WAL mode, a journal beside it)."""
    try:
        with open(db, "rb") as f:
            header = f.read(100)
            st = os.fstat(f.fileno())
    except OSError:
        return None
    if (len(header) < 100 or not header.startswith(b"SQLite format 3\0") or header[18] != 1
            or db.with_name(db.name + "-journal").exists()):
        return None
    return [st.st_ino, st.st_size, int.from_bytes(header[24:28], "big")]


def _db(tracker: Any) -> Path | None:
    return Path(tracker.uri.removeprefix("sqlite:///")) if tracker.uri.startswith("sqlite:///") else None


def _path(db: Path, experiment: str) -> Path:
    return db.with_name(f".{db.name}.{hashlib.sha256(experiment.encode()).hexdigest()[:12]}.sweep.json")


def load(tracker: Any) -> dict[str, Any] | None:
    """The saved answers for the tracker's experiment, if nothing was committed to its store
    since they were saved; else None (ask the store)."""
    if (db := _db(tracker)) is None or (counter := change_counter(db)) is None:
        return None
    try:
        saved = json.loads(_path(db, tracker.experiment).read_text())
    except (OSError, ValueError):
        return None
    ok = saved.get("format") == FORMAT and saved.get("counter") == counter and saved.get("experiment") == tracker.experiment
    return saved if ok else None


def save(tracker: Any) -> None:
    """Ask the store and save the answers (where MLflow is loaded anyway: the end of a sweep);
    nothing is saved if a transaction was committed meanwhile."""
    from harness.resume import finished_runs
    from harness.tracking.ui import VIEW_TAG

    if (db := _db(tracker)) is None or (before := change_counter(db)) is None:
        return
    client = tracker.client()
    exp = client.get_experiment_by_name(tracker.experiment)
    if exp is None:
        return
    answers = {"format": FORMAT, "counter": before, "experiment": tracker.experiment,
               "experiment_id": exp.experiment_id,
               "running": bool(client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=1)),
               "views": sorted(k.removeprefix(VIEW_TAG) for k in exp.tags if k.startswith(VIEW_TAG)),
               "finished": finished_runs(tracker)}
    if change_counter(db) != before:
        return
    from harness.ownership import temp_name

    path = _path(db, tracker.experiment)
    tmp = path.with_name(temp_name(path.name))
    try:
        tmp.write_text(json.dumps(answers))
        tmp.replace(path)
    except OSError:  # a read-only folder: the next sweep asks the store
        tmp.unlink(missing_ok=True)
