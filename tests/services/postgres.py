"""A throwaway PostgreSQL cluster and an ``mlflow server`` on it, for tests.

``postgres_server(folder)`` runs ``initdb`` and ``pg_ctl`` from PATH or from Debian's
``/usr/lib/postgresql/<version>/bin`` (package ``postgresql``), listening on 127.0.0.1 only, with
trust authentication (a test cluster, reachable from this machine alone), and yields the
SQLAlchemy URL of its database ``mlflow``, ``postgresql+psycopg2://...``: SQLAlchemy 2.1 reads a
bare ``postgresql://`` as the psycopg (3) driver, and the project installs psycopg2
(``psycopg2-binary``); :func:`libpq_url` turns it into the URL psycopg2 itself connects to.
PostgreSQL refuses to run as root: under root the cluster runs as the ``postgres`` system user
that Debian's package creates.

``mlflow_server(backend_uri, artifacts_folder)`` starts ``mlflow server`` on that store with
artifact proxying: clients upload and download artifacts through the server, which keeps them
under ``artifacts_folder`` (in production an ``s3://`` destination).

``postgres_missing()`` is ``None`` where both can run, else the reason (for ``skipif``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SYSTEM_USER = "postgres"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: PATH first, then the newest Debian version."""
    if (initdb := shutil.which("initdb")) and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")
             if Path(p).with_name("pg_ctl").exists()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


def libpq_url(sqlalchemy_url: str) -> str:
    """``postgresql+psycopg2://...`` as libpq (``psycopg2.connect``) reads it: ``postgresql://...``."""
    scheme, rest = sqlalchemy_url.split("://", 1)
    return f"{scheme.split('+', 1)[0]}://{rest}"


def _as_root() -> bool:
    return os.geteuid() == 0


def postgres_missing() -> str | None:
    """Why a PostgreSQL cluster cannot be started here, or None when it can."""
    if pg_bin() is None:
        return ("PostgreSQL not found: no initdb/pg_ctl on PATH or under /usr/lib/postgresql/*/bin "
                "(Debian: apt-get install postgresql)")
    if _as_root():
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"running as root and there is no '{SYSTEM_USER}' system user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing to run PostgreSQL as another user"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (dev dependency psycopg2-binary: uv sync)"
    return None


def _pg(*args: str | os.PathLike, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """A PostgreSQL program, as the ``postgres`` user when we are root."""
    cmd = [str(pg_bin() / str(args[0])), *map(str, args[1:])]
    if _as_root():
        cmd = ["runuser", "-u", SYSTEM_USER, "--", *cmd]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C", "LANG": "C"})


def _reachable_by_system_user(folder: Path) -> bool:
    r = subprocess.run(["runuser", "-u", SYSTEM_USER, "--", "test", "-w", str(folder), "-a", "-x", str(folder)],
                       capture_output=True)
    return r.returncode == 0


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@contextmanager
def postgres_server(folder: str | os.PathLike) -> Iterator[str]:
    """Start a PostgreSQL cluster in ``folder``, yield ``postgresql+psycopg2://postgres@127.0.0.1:<port>/mlflow``,
    stop it (``pg_ctl stop -m fast``) on exit.

    Under root, when the ``postgres`` user cannot write ``folder`` (pytest's temporary folders
    are private to their owner), the cluster lives in a folder of its own under the system's
    temporary directory, removed on exit.
    """
    if (reason := postgres_missing()) is not None:
        raise RuntimeError(reason)
    import psycopg2

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    private = None
    if _as_root():
        user = pwd.getpwnam(SYSTEM_USER)
        if not _reachable_by_system_user(folder):
            private = Path(tempfile.mkdtemp(prefix="pg-"))
        home = private or folder / "postgres"
        home.mkdir(exist_ok=True)
        os.chown(home, user.pw_uid, user.pw_gid)
    else:
        home = folder / "postgres"
        home.mkdir(exist_ok=True)
    data, log = home / "data", home / "server.log"
    started = False
    try:
        r = _pg("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync",
                cwd=home)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        port = free_port()
        with open(data / "postgresql.conf", "a") as conf:  # written by postgres, appendable by its owner
            conf.write(f"\n# test cluster\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                       f"unix_socket_directories = '{home}'\nfsync = off\nsynchronous_commit = off\n"
                       "full_page_writes = off\nshared_buffers = 16MB\n")
        started = True  # from here on, stop it on the way out (a start that timed out may still come up)
        r = _pg("pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "start", cwd=home)
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed ({r.returncode}):\n{r.stderr[-1500:]}\n"
                               f"server log:\n{_tail(log)}")
        con = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute("CREATE DATABASE mlflow")
        finally:
            con.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if started:
            r = _pg("pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "60", "stop", cwd=home)
            if r.returncode != 0 and (data / "postmaster.pid").exists():
                print(f"pg_ctl stop failed ({r.returncode}): {r.stderr[-1000:]}", file=sys.stderr)
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


@contextmanager
def mlflow_server(backend_uri: str, artifacts_folder: str | os.PathLike, workers: int = 2,
                  timeout: float = 180) -> Iterator[str]:
    """``mlflow server`` on ``backend_uri``, proxying artifacts into ``artifacts_folder``; yields
    its URL once ``/health`` answers; the server (its whole process group) is stopped on exit."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    Path(artifacts_folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+b") as out:
        proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
             "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts_folder)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,  # uvicorn's workers in its group
        )

        def tail() -> str:
            out.seek(0)
            return out.read().decode(errors="replace")[-3000:]

        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited with {proc.returncode} before answering /health:\n"
                                       f"{tail()}")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not answer {url}/health within {timeout:.0f} s:\n{tail()}")
                time.sleep(0.5)
            yield url
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the process group ``proc`` leads; SIGKILL it if its leader has not ended after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:  # the leader is alive, so the group is still ours to kill
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
