"""One MLflow run per job, written through ``MlflowClient`` (no global active-run state)."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000


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
    """

    def __init__(self, uri: str, experiment: str = "harness", artifact_location: str | None = None) -> None:
        self.uri = uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client()
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        loc = self.artifact_location
        if loc and "://" not in loc:
            Path(loc).mkdir(parents=True, exist_ok=True)
            loc = Path(loc).resolve().as_uri()
        try:
            return client.create_experiment(self.experiment, artifact_location=loc)
        except MlflowException:  # another job created it first
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    @contextmanager
    def start_run(self, run_name: str, tags: Mapping[str, str] | None = None) -> Iterator["RunLogger"]:
        """A run that ends FINISHED, or FAILED (with the error as a tag and artifact) when the
        body raises; the run is closed in every case."""
        client = self.client()
        run = client.create_run(self.experiment_id(), run_name=run_name, tags=dict(tags or {}))
        logger = RunLogger(client, run.info.run_id)
        try:
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
            client.set_terminated(run.info.run_id, "FINISHED")


class RunLogger:
    """Logging calls for one run, batched where MLflow allows."""

    def __init__(self, client, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

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

    def tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def table(self, df, artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=df, artifact_file=artifact_file)

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    @contextmanager
    def folder(self, artifact_path: str | None = None) -> Iterator[Path]:
        """A temporary folder whose contents are logged as artifacts when the block ends."""
        with tempfile.TemporaryDirectory(prefix="harness-") as tmp:
            yield Path(tmp)
            if any(Path(tmp).iterdir()):
                self.client.log_artifacts(self.run_id, tmp, artifact_path)


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
    """Hydra callback: create the tracking store and experiment once, before a sweep's jobs start.

    Parallel launchers (joblib) start several jobs at once; two processes creating a fresh
    SQLite store race ("table already exists"), so the sweep's parent process does it first.
    """

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        from hydra.utils import instantiate

        instantiate(config.tracking).experiment_id()
