"""A real Hydra multirun in a subprocess, into a temporary MLflow store."""

import json

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import make_cfg, run_harness
from harness.tracking.mlflow_tracker import run_summary


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir, trained_vit):
    tmp = tmp_path_factory.mktemp("sweep")
    # attnlrp runs before ig in the same process (the basic launcher runs jobs in order): ig's
    # maps must be those of ig alone, so a sweep is not poisoned by a method's patches.
    r = run_harness("-m", "xai=random,attnlrp,ig", "dataset.n=6", "experiment_name=sweep-test", "cache.dir=null",
                    "isolation=never",  # the scoped patches alone must keep ig clean
                    f"paths.cache_dir={cache_dir}", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                    f"tracking.artifact_location={tmp}/artifacts", f"hydra.sweep.dir={tmp}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    return client, {run.data.params["xai._target_"].rsplit(".", 1)[1]: run for run in runs}


def test_two_jobs_two_finished_runs(sweep):
    _, runs = sweep
    assert sorted(runs) == ["IntegratedGradients", "RandomExplainer", "TransformerLRP"]
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert len({r.data.tags["sweep_id"] for r in runs.values()}) == 1


def test_params_metrics_tags(sweep):
    _, runs = sweep
    for run in runs.values():
        p, m, t = run.data.params, run_summary(run), run.data.tags
        assert p["dataset.n"] == "6" and p["model.arch"] == "vit_tiny_patch16_224" and p["seed"] == "0"
        for key in ("accuracy", "srg", "srg_sem", "srg_ci95_low", "srg_ci95_high", "pointing_game",
                    "model_val_accuracy", "wall_seconds"):
            assert np.isfinite(m[key]), key
        assert m["n_images"] == 6 and m["model_val_accuracy"] >= 0.9
        assert t["seed"] == "0" and t["version.torch"] and t["version.mlflow"]
        assert len(t["git_commit"]) == 40
        # the UI's layout: the headline scores (mean and sem) as metrics, the rest as summary tags
        assert {"accuracy", "srg", "srg_sem", "pointing_game", "pointing_game_sem"} <= set(run.data.metrics)
        assert not set(run.data.metrics) & {"srg_ci95_low", "n_images", "wall_seconds", "model_val_accuracy"}
        assert float(t["summary.srg_ci95_low"]) == m["srg_ci95_low"] and "summary.seconds_explain" in t
    assert runs["IntegratedGradients"].data.params["xai.n_steps"] == "32"
    client, _ = sweep
    (eid,) = {r.info.experiment_id for r in runs.values()}
    assert client.get_experiment(eid).tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens its classic view


def test_artifacts(sweep, tmp_path):
    client, runs = sweep
    for run in runs.values():
        rid = run.info.run_id
        files = {f.path for f in client.list_artifacts(rid)}
        assert {"attributions.npz", "curves.npz", "curves.png", "config.yaml", "per_image.json", "overlays"} <= files
        assert len(client.list_artifacts(rid, "overlays")) == 6
        z = np.load(client.download_artifacts(rid, "attributions.npz", str(tmp_path)))
        assert z["attributions"].shape == (6, 32, 32) and np.isfinite(z["attributions"]).all()
        table = json.load(open(client.download_artifacts(rid, "per_image.json", str(tmp_path))))
        assert len(table["data"]) == 6 and "srg" in table["columns"] and "pointing_game" in table["columns"]
        col = table["columns"].index("srg")
        mean = np.mean([row[col] for row in table["data"]])
        assert mean == pytest.approx(run_summary(run)["srg"], rel=1e-6)  # the table backs the metric


def test_ig_after_attnlrp_equals_ig_alone(sweep, trained_vit, tmp_path):
    from hydra.utils import instantiate

    client, runs = sweep
    rid = runs["IntegratedGradients"].info.run_id
    swept = np.load(client.download_artifacts(rid, "attributions.npz", str(tmp_path)))["attributions"]
    cfg = make_cfg(["dataset.n=6"])
    data = instantiate(cfg.dataset)
    x, _ = trained_vit.preprocess(data.images, data.masks)
    assert cfg.target == "label"
    alone = instantiate(cfg.xai)(trained_vit, x, data.labels)
    np.testing.assert_allclose(swept, alone, rtol=1e-4, atol=1e-6)


def test_failing_job_is_recorded_and_explained(tmp_path):
    r = run_harness("dataset=npz", f"dataset.path={tmp_path}/missing.npz",
                    f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a",
                    f"hydra.run.dir={tmp_path}/out")
    assert r.returncode == 1 and "npz file not found" in r.stderr and "Traceback" not in r.stderr
    (run,) = MlflowClient(f"sqlite:///{tmp_path}/m.db").search_runs(["1"])
    assert run.info.status == "FAILED" and "npz file not found" in run.data.tags["error"]


def test_method_the_model_cannot_serve_is_refused_before_work(tmp_path):
    r = run_harness("model=timm", "model.name=resnet18", "model.num_classes=4", "xai=rollout",
                    "dataset.n=2", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                    f"tracking.artifact_location={tmp_path}/a", f"hydra.run.dir={tmp_path}/out")
    assert r.returncode == 1 and "does not serve this model (ResNet, not a timm ViT)" in r.stderr
    assert "gradcam" in r.stderr and "rollout" not in r.stderr.split("do:")[1] and "Traceback" not in r.stderr


def test_a_poisoned_job_does_not_stop_the_sweep(tmp_path):
    """One job fails (a method the model cannot serve): the other finishes, and the sweep ends
    with a summary that counts them and names the failed job, and a non-zero exit status."""
    r = run_harness("-m", "model=timm", "model.name=resnet18", "model.num_classes=4", "model.input_size=32",
                    "xai=rollout,random", "dataset.n=2", "metrics=[srg]", "~mllm",
                    f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a",
                    f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 1, r.stderr[-3000:]  # the sweep ran both jobs, and says one did not finish
    runs = MlflowClient(f"sqlite:///{tmp_path}/m.db").search_runs(["1"])
    assert sorted(x.info.status for x in runs) == ["FAILED", "FINISHED"]
    assert "sweep: 2 jobs: 1 finished, 0 skipped (already finished), 1 failed" in r.stdout
    assert "  job 0 (xai=rollout): FAILED run " in r.stdout and "does not serve this model" in r.stdout
    summary = json.load(open(tmp_path / "sweep" / "sweep_summary.json"))
    assert summary["failed"] == 1 and summary["seconds"]["explain"] >= 0
    assert [(j["job"], j["status"]) for j in summary["not_finished"]] == [(0, "FAILED")]


def test_every_metric_family_in_one_run(tmp_path, cache_dir, trained_vit):
    """All metric families through `python -m harness`: finite scores, curves, and each score's
    family and direction recorded for reports."""
    metrics = ("srg,pixel_flipping,region_perturbation,faithfulness_correlation,road,max_sensitivity,emprt,"
               "random_logit,sparseness,complexity,pointing_game,relevance_rank_accuracy,localisation_auc")
    r = run_harness("xai=saliency", "dataset.n=4", f"metrics=[{metrics}]", "metrics.pixel_flipping.steps=8",
                    "metrics.region_perturbation.regions=8", "metrics.faithfulness_correlation.nr_runs=10",
                    "metrics.max_sensitivity.nr_samples=2", "metrics.road.percentages=[20,60]",
                    f"paths.cache_dir={cache_dir}", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                    f"tracking.artifact_location={tmp_path}/a", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    m, t = run_summary(run), run.data.tags
    for score in ("srg", "pixel_flipping", "region_perturbation_morf_aopc", "region_perturbation_lerf_aopc",
                  "faithfulness_correlation", "road_morf", "max_sensitivity", "emprt", "random_logit",
                  "sparseness", "complexity", "pointing_game", "relevance_rank_accuracy", "localisation_auc"):
        assert np.isfinite(m[score]) and np.isfinite(m[f"{score}_ci95_low"]), score
    assert m["n_metric_errors"] == 0
    info = json.load(open(client.download_artifacts(run.info.run_id, "metric_info.json", str(tmp_path))))
    assert info["pixel_flipping"] == {"metric": "pixel_flipping", "family": "faithfulness", "higher_is_better": False}
    assert info["region_perturbation_lerf_aopc"]["higher_is_better"] is False
    assert info["region_perturbation_morf_aopc"]["higher_is_better"] is True
    assert info["srg_morf_auc"]["higher_is_better"] is False and info["srg"]["higher_is_better"] is True
    assert info["emprt"]["family"] == "randomisation" and info["localisation_auc"]["family"] == "localisation"
    assert t["higher_is_better.max_sensitivity"] == "false" and t["family.max_sensitivity"] == "robustness"
    curves = np.load(client.download_artifacts(run.info.run_id, "curves.npz", str(tmp_path)))
    assert curves["pixel_flipping_morf"].shape == (4, 9) and curves["road_morf"].shape == (4, 2)
    assert curves["region_perturbation_lerf"].shape == (4, 9)


def test_stage_cache_and_resume(tmp_path, cache_dir, trained_vit):
    """A second identical sweep launches no job (resume); with resume off it recomputes
    nothing that is cached, and its maps equal the first run's."""
    store = [f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a",
             f"paths.cache_dir={cache_dir}", f"cache.dir={tmp_path}/stages", f"language.cache_dir={tmp_path}/ans",
             "dataset.n=3", "metrics=[srg]"]
    runs = lambda: MlflowClient(f"sqlite:///{tmp_path}/m.db").search_runs(  # noqa: E731
        [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path}/m.db").search_experiments()],
        order_by=["attributes.start_time ASC"])
    r = run_harness("-m", "xai=random,saliency", f"hydra.sweep.dir={tmp_path}/s1", *store)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sweep: 2 jobs: 2 finished, 0 skipped (already finished), 0 failed" in r.stdout
    assert "sweep: job 1 of 2 (xai=random" in r.stderr and "sweep: job 2 of 2 (xai=saliency" in r.stderr
    assert "hits_predictions 1" in r.stdout and "misses_attributions 2" in r.stdout
    first = runs()
    assert [run_summary(x)["cache_misses_attributions"] for x in first] == [1, 1]
    assert [run_summary(x)["cache_hits_predictions"] for x in first] == [0, 1]  # same data and model
    r = run_harness("-m", "xai=random,saliency", f"hydra.sweep.dir={tmp_path}/s2", *store)
    assert r.returncode == 0 and "sweep: 2 of 2 jobs already finished: skipped" in r.stderr
    assert "sweep: 2 jobs: 0 finished, 2 skipped (already finished), 0 failed" in r.stdout
    assert len(runs()) == 2  # nothing ran again
    r = run_harness("xai=saliency", "resume=false", f"hydra.run.dir={tmp_path}/r3", *store)
    assert r.returncode == 0, r.stderr[-3000:]
    third = runs()[-1]
    assert run_summary(third)["cache_hits_attributions"] == 1 and run_summary(third)["cache_hits_predictions"] == 1
    assert run_summary(third)["answer_cache_hits"] == 3
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    saliency = next(x for x in first if x.data.tags["choice.xai"] == "saliency")
    a = np.load(client.download_artifacts(saliency.info.run_id, "attributions.npz", str(tmp_path / "d1")))
    b = np.load(client.download_artifacts(third.info.run_id, "attributions.npz", str(tmp_path / "d2")))
    np.testing.assert_array_equal(a["attributions"], b["attributions"])
    assert not list((tmp_path / "stages").rglob("*.tmp*"))
    assert len(list((tmp_path / "stages" / "attributions").rglob("*.npz"))) == 2


@pytest.mark.parametrize("n", [pytest.param(8, id="8-images"), pytest.param(None, id="as-written", marks=pytest.mark.slow)])
def test_the_promised_command(tmp_path, cache_dir, trained_vit, n):
    """``python -m harness -m xai=lime,shap,attnlrp`` on the default model: three FINISHED runs
    (with the default 64 images under -m slow; 8 in the default suite)."""
    r = run_harness("-m", "xai=lime,shap,attnlrp", *([f"dataset.n={n}"] if n else []), f"paths.cache_dir={cache_dir}",
                    f"cache.dir={tmp_path}/stages", f"language.cache_dir={tmp_path}/answers",
                    f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a",
                    f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sweep: 3 jobs: 3 finished, 0 skipped (already finished), 0 failed" in r.stdout
    runs = MlflowClient(f"sqlite:///{tmp_path}/m.db").search_runs(["1"])
    assert sorted((x.data.tags["choice.xai"], x.info.status) for x in runs) == [
        ("attnlrp", "FINISHED"), ("lime", "FINISHED"), ("shap", "FINISHED")]
