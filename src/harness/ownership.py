"""Who owns a run or a temporary file, and whether that owner is still alive.

A process is named by its host, pid and start time (``host~pid~start``): a pid alone is
reused by the operating system, the start time is not. On the same host an owner is alive
exactly when a process with that pid and start time exists. A process on another host cannot
be looked at; there a run counts as alive while its heartbeat (a tag the job refreshes, see
:func:`harness.tracking.mlflow_tracker.Tracker.start_run`) is younger than ``stale_after_s``.

Temporary files carry their owner in the name (:func:`temp_name`), so the files a killed job
leaves behind (a half-written cache entry, a store copy) are recognised and removed
(:func:`remove_stale_temps`) when a sweep starts, while files of live jobs, here or elsewhere,
stay.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

TEMP = re.compile(r"~(?P<host>[^~/]+)~(?P<pid>\d+)~(?P<start>\d+)~\.tmp")
OTHER_HOST_TEMP_MAX_AGE_S = 24 * 3600  # another host's temporary file older than this is removed


def _start_time(pid: int) -> int | None:
    """The process's start time in centiseconds since the epoch (None: no such process)."""
    import psutil

    try:
        return int(psutil.Process(pid).create_time() * 100)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


@cache
def host() -> str:
    return socket.gethostname().replace("~", "-")


def me() -> dict[str, str]:
    """This process as tags: ``owner.host``, ``owner.pid``, ``owner.start``."""
    pid = os.getpid()
    return {"owner.host": host(), "owner.pid": str(pid), "owner.start": str(_start_time(pid))}


def process_alive(owner_host: str, pid: int, start: int) -> bool | None:
    """Whether the process ``host~pid~start`` runs (None: it is on another host, unknown)."""
    if owner_host != host():
        return None
    return _start_time(pid) == start


def run_alive(tags: dict[str, str], last_seen_ms: int, stale_after_s: float) -> bool:
    """Whether a RUNNING run's process is alive, from its owner tags (same host) or, on another
    host or without owner tags, from when it was last seen (heartbeat or start, in ms)."""
    try:
        alive = process_alive(tags["owner.host"], int(tags["owner.pid"]), int(tags["owner.start"]))
    except (KeyError, ValueError):
        alive = None
    if alive is not None:
        return alive
    return time.time() - last_seen_ms / 1000 < stale_after_s


def temp_name(stem: str) -> str:
    """A temporary file name for ``stem`` that names this process as its owner."""
    pid = os.getpid()
    return f".{stem}~{host()}~{pid}~{_start_time(pid)}~.tmp"


def remove_stale_temps(*folders: str | os.PathLike | None, recursive: bool = True) -> int:
    """Remove the temporary files and folders in ``folders`` (and below, if ``recursive``)
    whose owner is dead (on this host; on another host: older than a day). Returns how many
    were removed."""
    removed = 0
    now = time.time()
    for folder in folders:
        if folder is None or not Path(folder).is_dir():
            continue
        for path in (Path(folder).rglob if recursive else Path(folder).glob)("*~.tmp*"):
            m = TEMP.search(path.name)
            if m is None:
                continue
            alive = process_alive(m["host"], int(m["pid"]), int(m["start"]))
            try:
                if alive is False or (alive is None and now - path.lstat().st_mtime > OTHER_HOST_TEMP_MAX_AGE_S):
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # removed meanwhile by its owner or another sweep
    if removed:
        log.info("removed %d temporary file(s) left by killed jobs", removed)
    return removed
