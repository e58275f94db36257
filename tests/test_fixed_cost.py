"""The fixed cost of a job: resume decided before heavy imports, each job composed once, a new
store copied from a migrated template, patching methods that scope their patches run warm."""

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from conftest import ROOT, make_cfg, run_harness
from hydra_plugins.harness_sweeper.harness_sweeper import covering_jobs


def sweep(tmp_path, cache_dir, *extra):
    return run_harness("-m", "xai=random,saliency", "seed=0,1", "dataset.n=2", "metrics=[srg]", "~mllm",
                       f"paths.cache_dir={cache_dir}", f"cache.dir={tmp_path}/stages",
                       f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a", *extra)


def test_a_finished_sweep_runs_again_without_torch_or_a_second_run(tmp_path, cache_dir, trained_vit):
    first = sweep(tmp_path, cache_dir, f"hydra.sweep.dir={tmp_path}/s1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "4 finished" in first.stdout
    again = subprocess.run([sys.executable, "-X", "importtime", "-m", "harness", "-m", "xai=random,saliency",
                            "seed=0,1", "dataset.n=2", "metrics=[srg]", "~mllm", f"paths.cache_dir={cache_dir}",
                            f"cache.dir={tmp_path}/stages", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                            f"tracking.artifact_location={tmp_path}/a", f"hydra.sweep.dir={tmp_path}/s2"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 finished, 4 skipped" in again.stdout
    assert "sweep: 4 of 4 jobs already finished: skipped" in again.stderr  # left out before launch
    assert "sweep: job" not in again.stderr and not (tmp_path / "s2" / "0").exists()  # nothing launched
    skipped = json.loads((tmp_path / "s2" / "skipped_jobs.json").read_text())
    assert sorted(s["finished_run"] for s in skipped) == sorted(r.info.run_id for r in MlflowClient(
        f"sqlite:///{tmp_path}/m.db").search_runs([MlflowClient(f"sqlite:///{tmp_path}/m.db").get_experiment_by_name(
            "harness").experiment_id]))
    imported = {line.rsplit("|", 1)[-1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "timm" not in imported and "harness.pipeline" not in imported
    assert (tmp_path / "s2" / "finished_configs.json").exists()
    runs = MlflowClient(f"sqlite:///{tmp_path}/m.db").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path}/m.db").get_experiment_by_name("harness").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}


def test_a_job_the_index_does_not_know_finds_its_run_itself(tmp_path, cache_dir, trained_vit):
    first = sweep(tmp_path, cache_dir, f"hydra.sweep.dir={tmp_path}/s1")
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "finished_configs.json").write_text("{}")  # as if the store knew nothing yet
    from harness.resume import finished_in_sweep, index_finished
    from harness.tracking.mlflow_tracker import Tracker

    index_finished(Tracker(f"sqlite:///{tmp_path}/m.db", "harness"), tmp_path / "s3")
    assert len(json.loads((tmp_path / "s3" / "finished_configs.json").read_text())) == 4
    cfg = make_cfg(["xai=random", "seed=0", "dataset.n=2", "metrics=[srg]", "~mllm", f"paths.cache_dir={cache_dir}",
                    f"cache.dir={tmp_path}/stages", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                    f"tracking.artifact_location={tmp_path}/a"])
    assert finished_in_sweep(cfg, tmp_path / "s3") is not None  # the job's own hash is the index's
    assert finished_in_sweep(cfg, tmp_path / "s2") is None


def test_the_sweeper_validates_one_job_per_value():
    batch = [[f"xai={x}", f"seed={s}", f"prompt={p}"] for x in ("a", "b", "c") for s in (0, 1) for p in ("p", "q")]
    kept = covering_jobs(batch)
    assert len(kept) == 5  # a/0/p, a/0/q, a/1/p, b/0/p, c/0/p
    assert {o for job in kept for o in job} == {o for job in batch for o in job}


def test_a_bad_value_still_stops_the_sweep_before_any_job(tmp_path):
    """Hydra's own check in the sweeper (the command-line check of :mod:`harness.choices` stands
    aside when search paths are given, as options may come from them)."""
    r = run_harness("-m", "xai=random,nope", "~mllm", f"hydra.searchpath=[file://{ROOT}/experiments]",
                    f"tracking.uri=sqlite:///{tmp_path}/m.db",
                    f"tracking.artifact_location={tmp_path}/a", f"hydra.sweep.dir={tmp_path}/s")
    assert r.returncode != 0 and "Could not find 'xai/nope'" in r.stderr
    assert "sweep: job" not in r.stderr  # no job started


def test_new_stores_are_copies_of_one_migrated_template(tmp_path):
    code = ("import sys; from harness.tracking.mlflow_tracker import Tracker; "
            "t = Tracker(f'sqlite:///{sys.argv[1]}/m.db', 'e', sys.argv[1] + '/a', sys.argv[2]); "
            "print(t.experiment_id())")
    tpl = tmp_path / "templates"
    first = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s0"), str(tpl)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "Creating initial MLflow database tables" in first.stderr  # the template, migrated once
    # four processes create the same new store at once: one store, one experiment, no error
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s1"), str(tpl)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert not any("Creating initial MLflow database tables" in e for _, e in outs)  # copied, not migrated
    assert len({o.strip() for o, _ in outs}) == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/s1/m.db")
    assert sorted(e.name for e in client.search_experiments()) == ["Default", "e"]
    assert client.get_experiment("0").artifact_location == (tmp_path / "s1" / "a" / "0").as_uri()
    run = client.create_run(client.get_experiment_by_name("e").experiment_id)
    client.log_metric(run.info.run_id, "x", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"x": 1.0}
    assert not list((tmp_path / "s1").glob(".*tmp"))  # no stray temporary files


@pytest.mark.parametrize(("option", "isolated"), [("cplrp", False), ("attnlrp", False), ("lrp", False), ("ig", False)])
def test_methods_that_scope_their_patches_run_in_the_warm_process(option, isolated):
    from harness.isolation import wants_isolation

    assert wants_isolation(make_cfg([f"xai={option}"])) is isolated
