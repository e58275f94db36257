"""One MLflow run per job, written through ``MlflowClient`` (no global active-run state)."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000
# A run's MLflow metrics are its headline, what a sweep's runs are compared by: accuracy and each
# score's mean and standard error (``<score>_sem``). The rest of its summary (95 % intervals,
# counts, cache hits, seconds, the classifier's training figures) goes into tags
# ``summary.<name>``, so that the UI's charts and columns are the science alone.
SUMMARY_TAG = "summary."
# Opens an experiment in the UI's classic mode (runs table, charts, compare), not its GenAI mode.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def run_summary(run: Any) -> dict[str, float]:
    """A run's summary as the job returned it: its metrics and its ``summary.*`` tags."""
    return {**run.data.metrics, **{k.removeprefix(SUMMARY_TAG): float(v) for k, v in run.data.tags.items()
                                   if k.startswith(SUMMARY_TAG)}}


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config to ``{"a.b.c": "value"}``; values made strings and cut to MLflow's limit."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:MAX_PARAM_LEN]
    return out


class Tracker:
    """Builds runs in one MLflow experiment.

    Args:
        uri: tracking URI: ``sqlite:///path/mlflow.db`` (embedded, the default) or a server's
            ``http://host:port``.
        experiment: experiment name; created on first use.
        artifact_location: where a *new* experiment keeps artifacts (a folder path or URI);
            ``None`` leaves it to MLflow (a server uses its own artifact root).
        store_templates: a folder for empty, fully migrated SQLite stores, one per MLflow
            version (see :func:`create_sqlite_store`); ``None``: MLflow creates each new store.
        heartbeat_s: seconds between a running job's heartbeats (tag ``heartbeat``).
        stale_after_s: a RUNNING run of another host whose heartbeat is older than this counts
            as dead (:mod:`harness.tracking.claims`); on the job's own host its process is
            looked up instead.
    """

    def __init__(self, uri: str, experiment: str = "harness", artifact_location: str | None = None,
                 store_templates: str | None = None, heartbeat_s: float = 30.0, stale_after_s: float = 300.0) -> None:
        if not 0 < heartbeat_s < stale_after_s:
            from harness.types import HarnessError

            raise HarnessError(f"tracking.heartbeat_s={heartbeat_s} and tracking.stale_after_s={stale_after_s}: "
                               "need 0 < heartbeat_s < stale_after_s (a live run must beat before it counts as dead)")
        self.uri = uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.store_templates = store_templates
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._client = None

    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            if self.uri.startswith("sqlite:///"):
                create_sqlite_store(Path(self.uri.removeprefix("sqlite:///")), self.store_templates,
                                    self.artifact_location)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client()
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if not set(EXPERIMENT_KIND) & set(exp.tags):  # made before the harness set it; a user's choice stays
                for k, v in EXPERIMENT_KIND.items():
                    client.set_experiment_tag(exp.experiment_id, k, v)
            return exp.experiment_id
        loc = self.artifact_location
        if loc and "://" not in loc:
            Path(loc).mkdir(parents=True, exist_ok=True)
            loc = Path(loc).resolve().as_uri()
        try:
            return client.create_experiment(self.experiment, artifact_location=loc, tags=EXPERIMENT_KIND)
        except MlflowException:  # another job created it first
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    @contextmanager
    def start_run(self, run_name: str, tags: Mapping[str, str] | None = None) -> Iterator["RunLogger"]:
        """A run that ends FINISHED, or FAILED (with the error as a tag and artifact) when the
        body raises; the run is closed in every case. It names its process (tags ``owner.*``)
        and refreshes its ``heartbeat`` tag while the body runs, so a sweep can tell when its
        process has gone (:func:`harness.tracking.claims.reap`)."""
        from harness.ownership import me

        client = self.client()
        experiment_id = self.experiment_id()
        run = client.create_run(experiment_id, run_name=run_name,
                                tags={**dict(tags or {}), **me(), "heartbeat": f"{time.time():.0f}"})
        logger = RunLogger(client, run.info.run_id, experiment_id, self.stale_after_s)
        try:
            with heartbeat(client, run.info.run_id, self.heartbeat_s):
                yield logger
        except BaseException as e:
            try:
                msg = f"{type(e).__name__}: {e}"
                client.set_tag(run.info.run_id, "error", msg[:5000])
                client.log_text(run.info.run_id, msg, "error.txt")
            finally:
                client.set_terminated(run.info.run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        else:
            if logger.discarded:
                client.set_terminated(run.info.run_id, "KILLED")
                client.delete_run(run.info.run_id)
            else:
                client.set_terminated(run.info.run_id, "FINISHED")


@contextmanager
def heartbeat(client, run_id: str, every_s: float) -> Iterator[None]:
    """Refresh the run's ``heartbeat`` tag (unix seconds) every ``every_s`` while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                client.set_tag(run_id, "heartbeat", f"{time.time():.0f}")
            except Exception as e:  # noqa: BLE001 - a busy store: the next beat tries again
                log.debug("heartbeat of run %s failed: %s", run_id, e)

    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class RunLogger:
    """Logging calls for one run, batched where MLflow allows."""

    def __init__(self, client, run_id: str, experiment_id: str = "", stale_after_s: float = 300.0) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.stale_after_s = stale_after_s
        self.discarded = False

    def claim(self, config_hash: str) -> str | None:
        """Claim the configuration for this run (:func:`harness.tracking.claims.claim`): the id
        of a run that finished it (then :meth:`discard` this one), or None (run it)."""
        from harness.tracking.claims import claim

        return claim(self.client, self.experiment_id, config_hash, self.run_id, self.stale_after_s)

    def discard(self) -> None:
        """This run did nothing (its configuration finished elsewhere): it is deleted at the end."""
        self.discarded = True

    def params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and not math.isnan(v)]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def summary(self, headline: Mapping[str, float], rest: Mapping[str, float]) -> None:
        """``headline`` as metrics, ``rest`` as ``summary.<name>`` tags (see :data:`SUMMARY_TAG`)."""
        self.metrics(headline)
        self.tags({f"{SUMMARY_TAG}{k}": repr(float(v)) for k, v in rest.items() if v is not None and not math.isnan(v)})

    def tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):  # the most tags one request may carry
            self.client.log_batch(self.run_id, tags=items[i : i + 100])

    def table(self, df, artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=df, artifact_file=artifact_file)

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    @contextmanager
    def folder(self, artifact_path: str | None = None) -> Iterator[Path]:
        """A temporary folder whose contents are logged as artifacts when the block ends."""
        from harness.ownership import temp_name

        with tempfile.TemporaryDirectory(prefix=temp_name("harness-artifacts")) as tmp:
            yield Path(tmp)
            if any(Path(tmp).iterdir()):
                self.client.log_artifacts(self.run_id, tmp, artifact_path)


def create_sqlite_store(path: Path, templates: str | os.PathLike | None,
                        artifact_location: str | None = None) -> None:
    """Create a missing SQLite store at ``path``, once, whatever runs concurrently.

    MLflow creates a new store by running its whole chain of schema migrations (about 2 CPU-s,
    several seconds on a loaded machine), and two processes doing it at once race ("duplicate
    column name"). With ``templates``, an empty migrated template is made once per MLflow
    version in that folder, and a new store is a copy of it, put in place with a hard link,
    which fails if the file appeared meanwhile: store creation is atomic. Without (or on a file
    system without hard links) the migrations run under an exclusive lock on ``<path>.lock``.
    The new store's default experiment gets ``artifact_location/0``.
    """
    import sqlite3
    import uuid
    from importlib.metadata import version

    from harness.ownership import temp_name

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return
    root = (Path(artifact_location).resolve().as_uri() if artifact_location and "://" not in artifact_location
            else artifact_location or "./mlruns")

    def migrate(db: Path) -> None:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(f"sqlite:///{db}", root).engine.dispose()

    if templates is None:
        return _locked_create(path, migrate)
    folder = Path(templates)
    folder.mkdir(parents=True, exist_ok=True)
    template = folder / f"mlflow-{version('mlflow')}.db"

    def copy(src: Path, dst: Path) -> None:  # a consistent snapshot, whatever holds src open
        with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
            a.backup(b)
        a.close()
        b.close()

    if not template.exists():
        fresh = folder / temp_name(f"{uuid.uuid4().hex}.db")
        migrate(fresh)
        tmp = folder / temp_name(f"{uuid.uuid4().hex}.db")
        copy(fresh, tmp)
        fresh.unlink()
        os.replace(tmp, template)
    tmp = path.parent / temp_name(path.name)
    try:
        copy(template, tmp)
        if artifact_location and "://" not in artifact_location:
            with sqlite3.connect(tmp) as db:
                db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                           ((Path(artifact_location).resolve() / "0").as_uri(),))
            db.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created the store first: use theirs
        except OSError:
            _locked_create(path, migrate)  # no hard links here
    finally:
        tmp.unlink(missing_ok=True)


def _locked_create(path: Path, migrate: Any) -> None:
    """``migrate`` a new store into a temporary file under an exclusive lock, then move it in place."""
    import fcntl

    from harness.ownership import temp_name

    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return
        tmp = path.parent / temp_name(path.name)
        try:
            migrate(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def package_versions(names: tuple[str, ...] = (
    "harness", "torch", "timm", "captum", "quantus", "mlflow", "hydra-core", "numpy", "transformers",
)) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[f"version.{n}"] = version(n)
        except PackageNotFoundError:
            pass
    return out


def git_commit(path: str | os.PathLike) -> dict[str, str]:
    import subprocess

    try:
        sha = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": sha, "git_dirty": str(bool(dirty))} if sha else {}


class PrepareStore(Callback):
    """Hydra callback: before a sweep's jobs start, create the tracking store and experiment
    once, mark the runs whose process is gone KILLED and remove the temporary files killed jobs
    left (:mod:`harness.tracking.claims`, :mod:`harness.ownership`), and index the configs that
    already finished (:mod:`harness.resume`). A SQLite store nothing was committed to since the
    last sweep's end is not opened: its answers were saved then (:mod:`harness.tracking.snapshot`).

    Parallel launchers (joblib) start several jobs at once; two processes creating a fresh
    SQLite store race ("table already exists"), so the sweep's parent process does it first.
    """

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        from hydra.utils import instantiate

        from harness.ownership import remove_stale_temps
        from harness.resume import index_finished
        from harness.tracking import snapshot
        from harness.tracking.claims import reap

        tracker = instantiate(config.tracking)
        saved = snapshot.load(tracker)  # the store's answers, when nothing was committed since the last sweep
        if saved is None or saved["running"]:
            reap(tracker.client(), tracker.experiment_id(), tracker.stale_after_s)
        store = Path(tracker.uri.removeprefix("sqlite:///")).parent if tracker.uri.startswith("sqlite:///") else None
        answers = config.language.get("cache_dir")
        remove_stale_temps(config.cache.get("dir"), answers and Path(answers) / "answers", tracker.store_templates)
        remove_stale_temps(store, tempfile.gettempdir(), recursive=False)
        if config.get("resume", False):
            index_finished(tracker, config.hydra.sweep.dir, saved and saved["finished"])
