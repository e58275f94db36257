"""Parallel jobs with Hydra's joblib launcher into one SQLite store."""

import pytest
from mlflow import MlflowClient

from conftest import run_harness
from harness.tracking.mlflow_tracker import run_summary


def store_args(tmp_path, cache_dir) -> list[str]:
    """The trained ViT's cache, and a stage cache, store and sweep folder of the test's own."""
    return [f"paths.cache_dir={cache_dir}", f"cache.dir={tmp_path}/stages", f"tracking.uri=sqlite:///{tmp_path}/m.db",
            f"tracking.artifact_location={tmp_path}/a", f"hydra.sweep.dir={tmp_path}/sweep"]


def test_joblib_three_jobs_two_workers_one_sqlite_store(tmp_path, cache_dir, trained_vit):
    r = run_harness("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "xai=random,saliency,ixg",
                    "dataset.n=3", "metrics=[srg]", f"language.cache_dir={tmp_path}/answers",
                    *store_args(tmp_path, cache_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sweep: 3 jobs: 3 finished, 0 skipped (already finished), 0 failed" in r.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(x.data.tags["choice.xai"] for x in runs) == ["ixg", "random", "saliency"]
    for run in runs:
        assert run.info.status == "FINISHED" and run_summary(run)["n_images"] == 3
        files = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"attributions.npz", "per_image.json", "answers.jsonl"} <= files
    assert len({x.data.tags["hydra_job_num"] for x in runs}) == 3


def test_submitit_local_executor_runs_the_sweep(tmp_path, cache_dir, trained_vit):
    """The SLURM launcher's code path, with submitit's local executor: each job in its own process."""
    r = run_harness("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "xai=random,saliency",
                    "dataset.n=2", "metrics=[srg]", "~mllm", *store_args(tmp_path, cache_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sweep: 2 jobs: 2 finished, 0 skipped (already finished), 0 failed" in r.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(x.data.tags["choice.xai"] for x in runs) == ["random", "saliency"]
    assert all(x.info.status == "FINISHED" for x in runs)
    assert list((tmp_path / "sweep" / ".submitit").iterdir())  # submitit's own job folders


def test_joblib_with_isolated_jobs(tmp_path, cache_dir, trained_vit):
    """A job run in its own process inside a joblib (loky) worker finishes like any other: the
    child is a plain subprocess, not a multiprocessing one that inherits loky's start method."""
    r = run_harness("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "isolation=always", "xai=random,saliency",
                    "dataset.n=2", "metrics=[srg]", "~mllm", *store_args(tmp_path, cache_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sweep: 2 jobs: 2 finished, 0 skipped (already finished), 0 failed" in r.stdout
    runs = MlflowClient(f"sqlite:///{tmp_path}/m.db").search_runs(["1"])
    assert sorted((x.data.tags["choice.xai"], x.info.status) for x in runs) == [("random", "FINISHED"),
                                                                                ("saliency", "FINISHED")]
    assert len({x.data.tags["owner.pid"] for x in runs}) == 2  # each in a child of its own


def test_optuna_tunes_an_explainer_against_a_score(tmp_path, cache_dir, trained_vit):
    """hydra/sweeper=optuna over SmoothGrad's noise, maximising SRG: each trial is a run, and the
    study's best value is the best run's score."""
    import yaml

    r = run_harness("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
                    "hydra.sweeper.direction=maximize", "hydra.sweeper.sampler.seed=0", "optimize=srg",
                    "xai=smoothgrad", "xai.n_samples=4", "xai.noise_level=interval(0.02,0.5)", "dataset.n=3",
                    "metrics=[srg]", "~mllm", *store_args(tmp_path, cache_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    runs = MlflowClient(f"sqlite:///{tmp_path}/m.db").search_runs(["1"])
    assert len(runs) == 3 and all(x.info.status == "FINISHED" for x in runs)
    assert len({x.data.params["xai.noise_level"] for x in runs}) == 3
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(run_summary(x)["srg"] for x in runs))
