"""A sweep killed with SIGKILL and run again ends with exactly the expected finished runs."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from conftest import ROOT, run_harness

METHODS = ["random", "saliency", "ixg"]


def finished(db) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as con:
            return con.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def sweep_args(tmp_path, cache_dir, i):
    return ["-m", f"xai={','.join(METHODS)}", "dataset.n=3", "metrics=[srg]", "~mllm",
            f"paths.cache_dir={cache_dir}", f"cache.dir={tmp_path}/stages",
            f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a",
            f"hydra.sweep.dir={tmp_path}/sweep{i}"]


def kill_after(tmp_path, cache_dir, n_finished: int, i: int) -> None:
    """Start the sweep and SIGKILL it (its whole process group) once ``n_finished`` runs are FINISHED."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "harness", *sweep_args(tmp_path, cache_dir, i)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while finished(tmp_path / "m.db") < n_finished and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


@pytest.mark.parametrize("kill_points", [pytest.param((1,), id="after-1"),
                                         pytest.param((1, 2), id="after-1-then-2", marks=pytest.mark.slow)])
def test_killed_sweep_resumes_without_loss_or_duplicates(tmp_path, cache_dir, trained_vit, kill_points):
    for i, n in enumerate(kill_points):
        kill_after(tmp_path, cache_dir, n, i)
    r = run_harness(*sweep_args(tmp_path, cache_dir, "final"))
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    done = [x for x in runs if x.info.status == "FINISHED"]
    assert sorted(x.data.tags["choice.xai"] for x in done) == sorted(METHODS)  # none lost, none twice
    assert len({x.data.tags["config_hash"] for x in done}) == len(METHODS)
    assert all(x.info.status in ("FINISHED", "RUNNING") for x in runs)  # killed runs never claim FINISHED
    assert not list((tmp_path / "stages").rglob("*.tmp*"))  # no half-written cache entry
