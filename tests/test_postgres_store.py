"""Sweeps against a production-style store: ``mlflow server`` on PostgreSQL, artifacts proxied.

The server keeps runs in a real PostgreSQL database and artifacts under its
``--artifacts-destination`` folder (in production an S3 bucket); jobs upload through the server.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import ROOT, run_harness
from services.postgres import libpq_url, mlflow_server, postgres_missing, postgres_server
from harness.tracking.mlflow_tracker import run_summary

MISSING = postgres_missing()
pytestmark = [pytest.mark.postgres, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

KILL_METHODS = ["random", "saliency", "ixg", "ig"]


class Server:
    def __init__(self, url: str, db: str, artifacts) -> None:
        self.url, self.db, self.artifacts = url, db, artifacts

    def sql(self, query: str, *args):
        """Rows of a query on the server's PostgreSQL database."""
        import psycopg2

        con = psycopg2.connect(libpq_url(self.db))
        try:
            with con.cursor() as cur:
                cur.execute(query, args)
                return cur.fetchall()
        finally:
            con.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with postgres_server(tmp_path_factory.mktemp("postgres")) as db:
        artifacts = tmp_path_factory.mktemp("artifacts")
        with mlflow_server(db, artifacts, workers=2) as url:
            yield Server(url, db, artifacts)


def sweep_args(server, tmp, cache_dir, experiment: str, methods, sweep: str) -> list[str]:
    return ["-m", "tracking=server", f"tracking.uri={server.url}", f"experiment_name={experiment}",
            f"xai={','.join(methods)}", "dataset.n=2", "metrics=[srg]", "~mllm",
            f"paths.cache_dir={cache_dir}", f"cache.dir={tmp}/stages", f"language.cache_dir={tmp}/answers",
            f"hydra.sweep.dir={tmp}/{sweep}"]


def group_gone(pgid: int, timeout: float = 20) -> bool:
    """Whether every process of the group has ended (and been reaped) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def runs_of(client, name: str):
    exp = client.get_experiment_by_name(name)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def ended_otherwise(client, allowed=("FINISHED", "RUNNING", "KILLED")) -> list:
    """The runs of the killed sweep's experiment in another state (xai, status, error)."""
    return [(x.data.tags.get("choice.xai"), x.info.status, x.data.tags.get("error"))
            for x in runs_of(client, "pg-kill") if x.info.status not in allowed]


def test_sweep_logs_runs_to_postgres_and_artifacts_through_the_server(server, cache_dir, trained_vit, tmp_path):
    r = run_harness(*sweep_args(server, tmp_path, cache_dir, "pg", ["random", "saliency"], "sweep"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sweep: 2 jobs: 2 finished, 0 skipped (already finished), 0 failed" in r.stdout
    client = MlflowClient(server.url)
    runs = runs_of(client, "pg")
    assert sorted(x.data.tags["choice.xai"] for x in runs) == ["random", "saliency"]
    for run in runs:
        rid = run.info.run_id
        assert run.info.status == "FINISHED" and run_summary(run)["n_images"] == 2
        assert run.data.params["tracking.uri"] == server.url and run.data.params["dataset.n"] == "2"
        assert {"srg", "srg_sem", "srg_ci95_low", "accuracy"} <= set(run_summary(run))
        # proxied: the run's artifact root is the server's, and the bytes land in --artifacts-destination
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
        assert {"attributions.npz", "per_image.json", "config.yaml"} <= {f.path for f in client.list_artifacts(rid)}
        local = client.download_artifacts(rid, "attributions.npz", str(tmp_path / rid))
        with np.load(local) as z:
            assert z["attributions"].shape[0] == 2
        stored = server.artifacts / run.info.experiment_id / rid / "artifacts" / "attributions.npz"
        assert stored.is_file() and stored.read_bytes() == open(local, "rb").read()
        # the run really is in PostgreSQL, with its params and metrics
        assert server.sql("select status from runs where run_uuid = %s", rid) == [("FINISHED",)]
        assert server.sql("select value from params where run_uuid = %s and key = 'dataset.n'", rid) == [("2",)]
        assert server.sql("select count(*) from metrics where run_uuid = %s and key = 'srg'", rid) == [(1,)]
    assert server.sql("select count(*) from runs r join experiments e using (experiment_id) "
                      "where e.name = 'pg' and r.status = 'FINISHED'") == [(2,)]


@pytest.mark.slow  # about 70 s; the concurrent-sweeps test on PostgreSQL stays in CI
def test_parallel_sweep_killed_and_rerun_has_each_config_finished_once(server, cache_dir, trained_vit, tmp_path):
    """joblib with 2 workers over 4 jobs, SIGKILLed (whole process group) after the first run
    finishes, then run again: resume skips what finished, the rest runs, nothing twice."""
    client = MlflowClient(server.url)
    args = lambda sweep: sweep_args(server, tmp_path, cache_dir, "pg-kill", KILL_METHODS, sweep)  # noqa: E731
    parallel = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]

    def finished() -> list:
        return [x for x in runs_of(client, "pg-kill") if x.info.status == "FINISHED"]

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "killed-sweep.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "harness", *args("sweep0"), *parallel], cwd=ROOT, env=env,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 400
    while not finished() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    still_running = p.poll() is None
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()
    assert still_running, f"the sweep ended ({p.returncode}) before a run finished:\n{log.read_text()[-3000:]}"
    assert group_gone(p.pid), "processes of the killed sweep are still alive"
    done_before = finished()
    assert 1 <= len(done_before) < len(KILL_METHODS), "the kill came too late to interrupt the sweep"
    assert ended_otherwise(client, ("FINISHED", "RUNNING")) == []  # the killed runs are left RUNNING

    r = run_harness(*args("sweep1"), *parallel)
    assert r.returncode == 0, r.stderr[-3000:]
    k = len(done_before)
    assert (f"sweep: {len(KILL_METHODS)} jobs: {len(KILL_METHODS) - k} finished, {k} skipped (already finished), "
            "0 failed") in r.stdout
    done = finished()
    assert sorted(x.data.tags["choice.xai"] for x in done) == sorted(KILL_METHODS)  # none lost, none twice
    assert len({x.data.tags["config_hash"] for x in done}) == len(KILL_METHODS)
    assert {x.info.run_id for x in done_before} <= {x.info.run_id for x in done}  # finished runs were kept
    assert ended_otherwise(client, ("FINISHED", "KILLED")) == []  # killed runs reaped KILLED, none left RUNNING
    assert server.sql("select count(*) from runs r join experiments e using (experiment_id) "
                      "where e.name = 'pg-kill' and r.status = 'FINISHED'") == [(len(KILL_METHODS),)]


def test_four_concurrent_overlapping_sweeps_finish_each_config_once(server, cache_dir, trained_vit, tmp_path):
    """Four sweeps started together into the server, over overlapping configurations: each
    configuration is claimed by one run (the claim is an experiment name, atomic in PostgreSQL
    too), the others wait for it, and every sweep ends with all its jobs done."""
    overlaps = [["random", "saliency"], ["saliency", "ixg"], ["ixg", "random"], ["random", "saliency", "ixg"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "harness", *sweep_args(server, tmp_path, cache_dir, "pg-4", m,
                                                                          f"sweep{i}")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, m in enumerate(overlaps)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[-2000:] for o in outs]
    client = MlflowClient(server.url)
    done = [x for x in runs_of(client, "pg-4") if x.info.status == "FINISHED"]
    assert sorted(x.data.tags["choice.xai"] for x in done) == ["ixg", "random", "saliency"]
    assert server.sql("select count(*) from runs r join experiments e using (experiment_id) "
                      "where e.name = 'pg-4' and r.status = 'FINISHED' and r.lifecycle_stage = 'active'") == [(3,)]
