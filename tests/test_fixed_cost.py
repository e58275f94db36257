"""The fixed cost of a job: resume decided before heavy imports, each job composed once, a new
store copied from a migrated template, patching methods that scope their patches run warm."""

import json
import shutil
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf

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
    assert "mlflow" not in imported  # nothing was committed since the first sweep's end: its answers stand
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


def _job_hash(configs, overrides):
    from hydra.core.hydra_config import HydraConfig

    from harness.resume import config_hash

    parent = HydraConfig.instance().cfg
    try:
        return config_hash(configs.task_config(overrides))
    finally:
        HydraConfig.instance().cfg = parent


def _sweep_configs(conf_dir, cache, *overrides):
    """The sweeper's view of a sweep: Hydra's loader and the sweep's own config."""
    from hydra.core.global_hydra import GlobalHydra

    from harness.resume import JobConfigs

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        master = compose("config", overrides=[f"paths.cache_dir={cache}", *overrides], return_hydra_config=True)
        return JobConfigs(GlobalHydra.instance().config_loader(), master)


JOBS = [["xai=ig", "seed=1"], ["xai=lime", "prompt=general_audience"], ["model=cifar_resnet20", "dataset=cifar10"],
        ["experiment=offline_demo", "xai=saliency"], ["xai=freemcg", "xai/denoiser=wiener"]]


def test_a_remembered_job_config_resolves_as_a_fresh_compose(tmp_path, monkeypatch):
    """What the sweeper recalls instead of composing gives each job the hash a compose gives,
    read in the sweep's own environment; an edit of any config file composes again."""
    from harness import CONF_DIR
    from harness.resume import config_hash

    jobs = [[f"paths.cache_dir={tmp_path}", *job] for job in JOBS]  # a batch holds all of a job's overrides
    first = _sweep_configs(CONF_DIR, tmp_path)
    hashes = [_job_hash(first, job) for job in jobs]
    assert (first.composed, first.recalled) == (len(jobs), 0)
    assert len(list((tmp_path / "composed").iterdir())) == len(jobs)
    again = _sweep_configs(CONF_DIR, tmp_path)
    assert [_job_hash(again, job) for job in jobs] == hashes
    assert (again.composed, again.recalled) == (0, len(jobs))
    assert hashes == [config_hash(make_cfg(job)) for job in jobs]  # the hash each job records for itself

    monkeypatch.setenv("HARNESS_SHARED_DATA", str(tmp_path / "elsewhere"))  # read live, not remembered
    moved = _sweep_configs(CONF_DIR, tmp_path)
    moved_hashes = [_job_hash(moved, job) for job in jobs]
    assert moved_hashes == [config_hash(make_cfg(job)) for job in jobs]
    assert moved.recalled == len(jobs) and all(a != b for a, b in zip(hashes, moved_hashes))
    monkeypatch.undo()  # the environment as it was

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    copied = _sweep_configs(conf, tmp_path)
    assert [_job_hash(copied, job) for job in jobs] == hashes and copied.composed == len(jobs)  # another folder
    (conf / "xai" / "ig.yaml").write_text((conf / "xai" / "ig.yaml").read_text().replace("n_steps: 32", "n_steps: 8"))
    edited = _sweep_configs(conf, tmp_path)
    assert _job_hash(edited, jobs[0]) != hashes[0] and edited.composed == 1


def test_jobs_the_memo_cannot_place_are_composed_every_time(tmp_path):
    from harness.resume import memo_key, remember

    assert memo_key("config", ["hydra.job.chdir=true"], "d") is None  # Hydra's own settings
    assert memo_key("config", ["hydra/launcher=joblib"], "d") is None
    assert memo_key("config", ["mllm.api_key=sk-0123456789abcdef"], "d") is None  # a credential: not on disk
    assert memo_key("config", ["xai=ig"], "d") != memo_key("config", ["xai=ig"], "e")
    remember(tmp_path, "k", OmegaConf.create({"out": "${hydra:runtime.output_dir}"}), {})
    assert not (tmp_path / "k.pkl.z").exists()  # reads a per-job Hydra value: only a compose knows it
    remember(tmp_path, "k", OmegaConf.create({"name": "${hydra:runtime.choices.xai}"}), {"xai": "ig"})
    assert (tmp_path / "k.pkl.z").exists()


def test_a_store_is_asked_again_once_anything_was_committed_to_it(tmp_path):
    """The saved answers of a SQLite store (harness.tracking.snapshot) hold while its change
    counter does; a commit, a transaction under way or WAL mode sends the sweep to the store."""
    import sqlite3

    from harness.tracking import snapshot
    from harness.tracking.mlflow_tracker import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "e", f"{tmp_path}/a", str(tmp_path / "templates"))
    client = tracker.client()
    run = client.create_run(tracker.experiment_id(), tags={"config_hash": "h1"})
    client.set_terminated(run.info.run_id, "FINISHED")
    assert snapshot.load(tracker) is None  # never saved
    snapshot.save(tracker)
    saved = snapshot.load(tracker)
    assert saved["finished"] == {"h1": run.info.run_id} and saved["running"] is False
    assert snapshot.load(Tracker(tracker.uri, "other")) is None  # per experiment
    running = client.create_run(tracker.experiment_id())  # a commit
    assert snapshot.load(tracker) is None
    snapshot.save(tracker)
    assert snapshot.load(tracker)["running"] is True  # the sweep reaps
    client.set_terminated(running.info.run_id, "FAILED")
    snapshot.save(tracker)
    journal = tmp_path / "m.db-journal"
    journal.write_bytes(b"")
    assert snapshot.load(tracker) is None  # a transaction under way (or a hot journal)
    journal.unlink()
    assert snapshot.load(tracker) is not None
    with sqlite3.connect(tmp_path / "m.db") as db:
        db.execute("PRAGMA journal_mode=WAL")
    assert snapshot.change_counter(tmp_path / "m.db") is None and snapshot.load(tracker) is None
    assert snapshot.load(Tracker("http://127.0.0.1:5000", "e")) is None  # a server: always asked
