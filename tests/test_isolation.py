"""A method that leaves a patch behind cannot poison the next job of the sweep."""

import numpy as np
import pytest
from hydra.utils import instantiate
from mlflow import MlflowClient

from conftest import ROOT, make_cfg, run_harness


def ig_maps_after_leaky(tmp_path, cache_dir, isolation):
    r = run_harness("-m", "xai=leaky,ig", f"isolation={isolation}", "dataset.n=3", "metrics=[srg]", "~mllm",
                    "cache.dir=null", f"hydra.searchpath=[file://{ROOT}/tests/conf]", f"paths.cache_dir={cache_dir}",
                    f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a",
                    f"hydra.sweep.dir={tmp_path}/sweep", env={"PYTHONPATH": str(ROOT / "tests")})
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    (ig,) = [x for x in client.search_runs(["1"]) if x.data.tags["choice.xai"] == "ig"]
    assert ig.info.status == "FINISHED"
    return np.load(client.download_artifacts(ig.info.run_id, "attributions.npz", str(tmp_path)))["attributions"]


@pytest.fixture(scope="module")
def ig_alone(trained_vit):
    cfg = make_cfg(["dataset.n=3"])
    data = instantiate(cfg.dataset)
    x, _ = trained_vit.preprocess(data.images, data.masks)
    return instantiate(cfg.xai)(trained_vit, x, data.labels)


def test_leaky_method_runs_in_its_own_process(tmp_path, cache_dir, ig_alone):
    np.testing.assert_allclose(ig_maps_after_leaky(tmp_path, cache_dir, "auto"), ig_alone, rtol=1e-4, atol=1e-6)


def test_without_isolation_the_leak_shows(tmp_path, cache_dir, ig_alone):
    """The check above can fail: in one process the leaked patch changes the next job's maps."""
    poisoned = ig_maps_after_leaky(tmp_path, cache_dir, "never")
    assert np.abs(poisoned - ig_alone).max() > 1e-3 * np.abs(ig_alone).max()
