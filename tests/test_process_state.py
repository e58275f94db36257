"""Library code leaves the process as it found it: a job's results do not depend on the jobs run
before it in the same process, and after a job (or a figure, or an explainer) the caller's global
RNGs, matplotlib backend, pyplot figures and environment are what they were."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import ROOT, make_cfg

# The cheapest job: a timm ViT with random weights (made from the job's seed, no training),
# three images, two sampled answers per image (so the consistency metric and its TF-IDF
# fallback run), a short SRG curve (so the curves figure is drawn), no stage caches.
CHEAP = ["model=timm", "model.name=vit_tiny_patch16_224", "model.num_classes=4",
         *(f"model.kwargs.{k}" for k in ("img_size=32", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2")),
         "dataset.n=3", "metrics=[srg]", "metrics.srg.steps=4", "text_metrics=[consistency,readability]",
         "mllm.decoding.num_samples=2", "mllm.decoding.do_sample=true", "isolation=never", "resume=false", "cache.dir=null", "language.cache_dir=null"]
JOBS = {"lime": ["xai=lime", "xai.num_samples=64", "xai.segmentation=grid", "xai.patch=8"],
        "smoothgrad": ["xai=smoothgrad", "xai.n_samples=4"]}
CONTEXT = {"tags": {}, "choices": {}, "output_dir": None}
ALONE = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import make_cfg
from harness.pipeline import run
print("RESULT " + json.dumps(run(make_cfg({overrides!r}), {context!r})))
"""


def overrides(tmp, job: str, experiment: str) -> list[str]:
    return [*CHEAP, *JOBS[job], f"experiment_name={experiment}", f"paths.cache_dir={tmp}/cache",
            f"tracking.uri=sqlite:///{tmp}/m.db", f"tracking.artifact_location={tmp}/a"]


def warm_imports() -> None:
    """Import the third-party modules a job uses: some change the process when first imported
    (sklearn sets ``KMP_*`` variables, scipy and numpy add warning filters, one import draws from
    Python's RNG), which is theirs to do once and not the harness's doing."""
    import importlib

    for name in ("lime.lime_image", "sklearn.feature_extraction.text", "sklearn.linear_model", "skimage.segmentation",
                 "sentence_transformers", "timm", "mlflow", "PIL.Image", "matplotlib.figure",
                 "matplotlib.backends.backend_agg", "matplotlib.backends.backend_pdf", "textstat"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def snapshot() -> dict:
    """The process-wide state a job must not change."""
    import matplotlib
    import matplotlib.pyplot as plt

    return {
        "random": random.getstate(),
        "numpy": (lambda s: (s[0], s[1].tolist(), *s[2:]))(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
        "backend": matplotlib.get_backend(),
        "figures": plt.get_fignums(),
        "rc": {k: repr(v) for k, v in matplotlib.rcParams.items() if k != "backend"},
        # MLflow's telemetry thread unsets its own session variable whenever its (offline) fetch fails
        "environ": {k: v for k, v in os.environ.items() if not k.startswith("_MLFLOW_TELEMETRY")},
        "cwd": os.getcwd(),
        "torch_threads": torch.get_num_threads(),
        "grad": torch.is_grad_enabled(),
        "dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warnings": list(warnings.filters),
    }


def assert_same_state(before: dict, after: dict) -> None:
    changed = sorted(k for k in before if before[k] != after[k])
    env = {k: (before["environ"].get(k), after["environ"].get(k)) for k in {*before["environ"], *after["environ"]}
           if before["environ"].get(k) != after["environ"].get(k)}
    assert not changed, f"changed by library code: {changed} (environment: {env})"


@pytest.fixture
def foreign_state():
    """A caller whose RNGs are somewhere in their streams and whose matplotlib backend is not
    Agg (as in a notebook); put back as found afterwards."""
    import matplotlib

    warm_imports()
    backend = matplotlib.get_backend()
    matplotlib.use("svg")
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    random.random(), np.random.rand(7), torch.rand(5)
    try:
        yield
    finally:
        matplotlib.use(backend)


def runs_by_xai(client: MlflowClient, experiment: str) -> dict:
    exp = client.get_experiment_by_name(experiment)
    return {run.data.params["xai._target_"].rsplit(".", 1)[1]: run for run in client.search_runs([exp.experiment_id])}


def comparable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if "seconds" not in k and "latency" not in k}  # timings differ


def test_two_jobs_in_one_process_equal_each_job_alone_and_leave_no_state(tmp_path, foreign_state):
    from harness.pipeline import run

    together = {}
    for job in JOBS:  # lime, then smoothgrad, in this process
        before = snapshot()
        together[job] = run(make_cfg(overrides(tmp_path, job, "together")), CONTEXT)
        assert_same_state(before, snapshot())
    alone = {}
    for job in JOBS:  # each in a fresh interpreter
        script = ALONE.format(tests=str(ROOT / "tests"), overrides=overrides(tmp_path, job, "alone"), context=CONTEXT)
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        alone[job] = json.loads(r.stdout.split("RESULT ", 1)[1])
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = {name: runs_by_xai(client, name) for name in ("together", "alone")}
    assert sorted(runs["together"]) == sorted(runs["alone"]) == ["Lime", "SmoothGrad"]
    for job, cls in (("lime", "Lime"), ("smoothgrad", "SmoothGrad")):
        a, b = comparable(together[job]), comparable(alone[job])
        assert sorted(a) == sorted(b) and "srg" in a and "consistency_tfidf" in a, sorted(a)
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(a)], rtol=1e-5, atol=1e-7,
                                   err_msg=f"{job}: {sorted(a)}")
        maps = [np.load(client.download_artifacts(runs[name][cls].info.run_id, "attributions.npz",
                                                  str(tmp_path / name / job)))["attributions"] for name in runs]
        assert np.abs(maps[0]).max() > 0
        np.testing.assert_allclose(maps[0], maps[1], rtol=1e-5, atol=1e-7, err_msg=job)


def test_lime_seeds_for_itself_only(foreign_state):
    """lime reads numpy's global RNG: its maps do not depend on the caller's state, and the
    caller's state is the same afterwards."""
    from harness.xai.lime import Lime

    from test_benchmark import tiny_vit

    model, x, t = tiny_vit(), torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2])
    lime = Lime(num_samples=64, segmentation="grid", patch=8, seed=3)
    before = snapshot()
    first = lime(model, x, t)
    assert_same_state(before, snapshot())
    np.random.seed(99), random.seed(99), torch.manual_seed(99)
    np.testing.assert_array_equal(first, lime(model, x, t))


def test_figures_leave_pyplot_alone(tmp_path, foreign_state):
    """Curves, the sensitivity plot and report figures are drawn without pyplot: the backend and
    pyplot's figure list stay as they were, and the files are written."""
    import pandas as pd

    from harness.render.curves import plot_curves
    from harness.report import figures
    from harness.text.sensitivity import SensitivityResult, plot
    from harness.types import MetricOutput

    before = snapshot()
    srg = MetricOutput(scores={"srg": np.zeros(3)}, curves={"morf": np.random.default_rng(0).random((3, 5))},
                       curve_x=np.linspace(0, 1, 5))
    assert plot_curves({"srg": srg}, tmp_path / "c.png")
    rng = np.random.default_rng(1)
    plot(SensitivityResult(0.1, 0.04, 1.0, 0.3, 0.2, 2, 8, rng.random(50), pd.DataFrame(), rng.random(9),
                           rng.random(9)), tmp_path / "s.png")
    runs = pd.DataFrame({"xai": ["ig", "lime"], "mllm": ["verbaliser"] * 2, "readability": [1.0, 2.0]})
    with figures.paper_style():
        fig = figures.text_metrics(runs, ["readability"], {}, ["mllm"])
        assert snapshot()["figures"] == before["figures"]  # not a pyplot figure, even before it is saved
        paths = figures.save(fig, tmp_path, "t", ["png", "pdf"])
    assert_same_state(before, snapshot())
    assert all(p.stat().st_size > 0 for p in [tmp_path / "c.png", tmp_path / "s.png", *paths])
