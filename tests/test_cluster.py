"""Sweeps through Hydra's submitit SLURM launcher on a real single-node SLURM cluster.

``tests/services/slurm.sh`` starts munged, slurmctld and slurmd with all their state in a temporary
folder (needs the Debian packages slurm-wlm and munge). The jobs run on this machine, so one SQLite
file is the store of every job. The cluster has no accounting database: the script's ``sacct``
stand-in tells submitit the state of ended jobs (see the script).
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import ROOT, run_harness
from test_launchers import store_args
from harness.tracking.mlflow_tracker import run_summary

pytestmark = pytest.mark.cluster

SCRIPT = ROOT / "tests" / "services" / "slurm.sh"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")
# Two cores: one CPU per job, so SLURM runs two jobs at a time and queues the rest.
LAUNCHER = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=10",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.signal_delay_s=10"]
SMALL = ["dataset.n=2", "metrics=[srg]", "~mllm"]
METHODS = ["random", "saliency", "ixg", "ig", "smoothgrad", "gradcam", "occlusion", "lime"]


def _missing() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running cluster: the environment its clients need (``SLURM_CONF``, ``PATH``)."""
    if missing := _missing():
        pytest.skip(f"SLURM not installed: {', '.join(missing)} not on PATH "
                    "(apt-get install -y --no-install-recommends slurm-wlm munge)")
    folder = tmp_path_factory.mktemp("slurm")
    r = subprocess.run(["bash", str(SCRIPT), str(folder)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=120)
        pytest.fail(f"the SLURM cluster did not come up (exit code {r.returncode}):\n{r.stderr[-4000:]}")
    env = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    yield {"SLURM_CONF": env["SLURM_CONF"], "PATH": env["PATH"]}
    subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=120)


def squeue(env: dict[str, str]) -> list[tuple[str, str]]:
    """(job id, state) of every job the cluster knows, ended ones included."""
    out = subprocess.run(["squeue", "--noheader", "--states=all", "--array", "--format=%i %T"], capture_output=True,
                         text=True, env={**os.environ, **env}, timeout=30).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


def wait_until_idle(env: dict[str, str], timeout: float = 300) -> None:
    """Until no job is pending, running or completing."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not [j for j, s in squeue(env) if s in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING")]:
            return
        time.sleep(0.5)
    raise AssertionError(f"jobs still queued after {timeout} s: {squeue(env)}")


def start_sweep(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """``python -m harness ARGS`` in the background (stdout and stderr to one pipe)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "harness", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=full_env, cwd=ROOT)


def store_runs(db: Path) -> list[tuple[str, str, str | None, int]]:
    """(run id, status, choice.xai tag, start time in ms) of every run, read from the SQLite file directly
    (cheap to poll)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT r.run_uuid, r.status, t.value, r.start_time FROM runs r LEFT JOIN tags t "
                               "ON t.run_uuid = r.run_uuid AND t.key = 'choice.xai'").fetchall()
    except sqlite3.Error:  # not created yet, or being migrated
        return []


def all_runs(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


def test_eight_job_sweep_runs_as_a_slurm_job_array(tmp_path, cache_dir, trained_vit, slurm, capsys):
    seen: dict[str, set[str]] = {}
    most_running = 0
    t0 = time.monotonic()
    proc = start_sweep("-m", *LAUNCHER, f"xai={','.join(METHODS)}", *SMALL, *store_args(tmp_path, cache_dir),
                       env=slurm)
    while proc.poll() is None and time.monotonic() - t0 < 900:
        jobs = squeue(slurm)
        for job, state in jobs:
            seen.setdefault(job, set()).add(state)
        most_running = max(most_running, sum(s == "RUNNING" for _, s in jobs))
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate()[0]
    wall = time.monotonic() - t0
    assert proc.returncode == 0, out[-4000:]
    assert "sweep: 8 jobs: 8 finished, 0 skipped (already finished), 0 failed" in out, out[-4000:]

    runs = all_runs(tmp_path)
    assert sorted(r.data.tags["choice.xai"] for r in runs) == sorted(METHODS)
    assert all(r.info.status == "FINISHED" and run_summary(r)["n_images"] == 2 for r in runs)
    assert len({r.data.tags["config_hash"] for r in runs}) == 8

    # One SLURM array of eight tasks: each task's submitit folder and log name its SLURM job id.
    submitit = tmp_path / "sweep" / ".submitit"
    folders = sorted(p.name for p in submitit.iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    arrays = {f.split("_")[0] for f in folders}
    assert len(folders) == 8 and len(arrays) == 1, folders
    array = arrays.pop()
    assert sorted(folders) == sorted(f"{array}_{i}" for i in range(8))
    script = (submitit / array / f"{array}_submission.sh").read_text()
    assert "#SBATCH --array=0-7" in script and "#SBATCH --partition=debug" in script, script
    for f in folders:  # submitit reads the job id from SLURM's environment (SLURM_ARRAY_JOB_ID, ..._TASK_ID)
        log = (submitit / f / f"{f}_0_log.out").read_text()
        assert f"JobEnvironment(job_id={f}," in log and "Job completed successfully" in log, log[-2000:]
    # SLURM itself ran them: every task went through RUNNING to COMPLETED, at most two at a time (one CPU
    # each on two cores), the others waiting as PENDING.
    wait_until_idle(slurm, timeout=60)  # the launcher returns on the last result, before SLURM ends the job
    final = dict(squeue(slurm))
    assert all(final.get(f) == "COMPLETED" for f in folders), final
    assert any("RUNNING" in s for j, s in seen.items() if j.startswith(f"{array}_")), seen
    assert 1 <= most_running <= 2
    assert any(j.startswith(f"{array}_[") or "PENDING" in s for j, s in seen.items()), seen
    with capsys.disabled():
        print(f"\nSLURM sweep: {len(folders)} jobs (array {array}, at most {most_running} running at once) "
              f"in {wall:.1f} s wall time")


@pytest.mark.slow  # about 110 s: a second SLURM sweep after scancel; the array test above stays in CI
def test_cancelled_job_runs_again_when_the_sweep_is_resumed(tmp_path, cache_dir, trained_vit, slurm, capsys):
    # LIME's job is the one cancelled: about 10 s of explaining (32 images) after its run is created, longer
    # than the KillWait seconds a job goes on for after scancel (submitit's job process ignores SIGTERM).
    methods = ["random", "saliency", "ixg", "lime"]
    sweep = ["-m", *LAUNCHER, f"xai={','.join(methods)}", "dataset.n=32", "metrics=[srg]", "~mllm",
             *store_args(tmp_path, cache_dir)[:-1]]
    db = tmp_path / "m.db"
    proc = start_sweep(*sweep, f"hydra.sweep.dir={tmp_path}/sweep", env=slurm)
    cancelled = None  # (SLURM job id, MLflow run id, method)
    t0 = time.monotonic()
    try:
        while cancelled is None and proc.poll() is None and time.monotonic() - t0 < 600:
            running_jobs = {j for j, s in squeue(slurm) if s == "RUNNING"}
            lime = [run for run, status, xai, _ in store_runs(db) if status == "RUNNING" and xai == "lime"]
            # array task i is the sweep's job i
            job = next((j for j in running_jobs if j.endswith(f"_{methods.index('lime')}")), None)
            if lime and job is not None:
                subprocess.run(["scancel", job], env={**os.environ, **slurm}, check=True, timeout=30)
                cancelled = (job, lime[0], "lime")
                t_cancel = time.monotonic()
                break
            time.sleep(0.2)
        out = proc.communicate(timeout=600)[0]
        t_exit = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert cancelled is not None, f"no job was seen running with its MLflow run:\n{out[-4000:]}"
    job, run_id, xai = cancelled
    wait_until_idle(slurm)  # the array's other tasks go on after the launcher gives up on the cancelled one
    states = dict(squeue(slurm))
    if states.get(job) == "COMPLETED":  # it finished between the two looks: nothing was cancelled
        pytest.fail(f"job {job} ({xai}) completed before scancel reached it; make its jobs longer")
    assert states.get(job) == "CANCELLED", states
    statuses = {r.info.run_id: r.info.status for r in all_runs(tmp_path)}
    assert statuses[run_id] != "FINISHED", f"run {run_id} ({xai}) finished before scancel reached its job"

    again = run_harness(*sweep, f"hydra.sweep.dir={tmp_path}/sweep2", env=slurm, timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "sweep: 4 jobs: 1 finished, 3 skipped (already finished), 0 failed" in again.stdout, again.stdout

    runs = all_runs(tmp_path)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["choice.xai"] for r in finished) == sorted(methods)
    assert len({r.data.tags["config_hash"] for r in finished}) == 4
    # Only the cancelled configuration ran a second time, as one SLURM job.
    assert len(list((tmp_path / "sweep2" / ".submitit").glob("*/*_log.out"))) == 1
    # Its cancelled run (killed by SLURM, so it could not close itself) is marked KILLED by the resumed sweep.
    left = {r.info.run_id: r.info.status for r in runs if r.info.status != "FINISHED"}
    assert left == {run_id: "KILLED"}, left
    with capsys.disabled():
        error = next((line for line in out.splitlines() if "UncompletedJobError" in line and "raise" not in line), "")
        summary = next(line for line in again.stdout.splitlines() if line.startswith("sweep: "))
        print(f"\nscancel {job} ({xai}): the sweep exited with {proc.returncode} {t_exit - t_cancel:.0f} s later "
              f"({error[:300]}); resumed: {summary}")
