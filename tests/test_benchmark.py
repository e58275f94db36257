"""The speed benchmark (``python -m harness.benchmark``): its table and files, its errors, the
model costs the explainers state, and the references' equal settings."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from conftest import ROOT, make_cfg
from harness.benchmark.refs import NoReference, reference
from harness.data.shapes import make_shapes
from harness.models.cifar_resnet import CifarResNet
from harness.models.classifier import Classifier

TINY_VIT = ["model=timm", "model.name=vit_tiny_patch16_224", "model.num_classes=4",
            *(f"model.kwargs.{k}" for k in ("img_size=32", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2"))]


def run_benchmark(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "harness.benchmark", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def tiny_vit() -> Classifier:
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32,
                            patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return Classifier(net, input_size=32).eval()


def tiny_cnn() -> Classifier:
    torch.manual_seed(0)
    return Classifier(CifarResNet(depth=8, num_classes=4), input_size=32).eval()


def images(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack(make_shapes(n=n, seed=5).images)).permute(0, 3, 1, 2).float() / 255
    return x, torch.arange(n) % 4


def test_benchmark_command_prints_and_writes_the_table(tmp_path):
    out = tmp_path / "out"
    r = run_benchmark(*TINY_VIT, "dataset=shapes", "dataset.n=2", "n_images=2", "repeats=1",
                      "methods=[saliency,occlusion,rollout,random]", "xai_overrides={occlusion:{patch:8,stride:8}}",
                      f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["method"]: row for row in csv.DictReader(open(out / "benchmark.csv"))}
    assert list(rows) == ["saliency", "occlusion", "rollout", "random"]
    for name in ("saliency", "occlusion"):
        row = rows[name]
        assert row["status"] == "ok", row
        for key in ("s_per_image", "raw_s_per_image", "ratio_raw", "ref_s_per_image", "ratio_ref"):
            assert math.isfinite(float(row[key])) and float(row[key]) > 0, (name, key, row)
        assert math.isclose(float(row["ratio_raw"]), float(row["s_per_image"]) / float(row["raw_s_per_image"]))
    assert rows["saliency"]["model_cost"] == "1 fwd+bwd"
    assert rows["occlusion"]["model_cost"] == "17 fwd"  # the override reached it: 4 x 4 windows + the image
    # no packaged reference for rollout, no model work for random: their rows say so, no failure
    assert rows["rollout"]["reference"].startswith("n/a (") and rows["rollout"]["ref_s_per_image"] == ""
    assert float(rows["rollout"]["ratio_raw"]) > 0
    assert rows["random"]["status"] == "ok" and rows["random"]["ratio_raw"] == "" and float(rows["random"]["s_per_image"]) > 0
    for name in rows:  # the printed table has a line per method
        assert any(line.startswith(name) for line in r.stdout.splitlines()), r.stdout
    md = (out / "benchmark.md").read_text()
    assert "| saliency |" in md and "ratio a" in md


def test_unknown_method_is_a_clear_error(tmp_path):
    r = run_benchmark("methods=[ig,no_such_method]", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 1
    assert "unknown method(s) 'no_such_method'" in r.stderr and "valid:" in r.stderr and "lime" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_xai_overrides_are_clear_errors():
    from omegaconf import OmegaConf

    from harness.benchmark.core import compose_methods
    from harness.types import HarnessError

    base = OmegaConf.load(ROOT / "conf" / "benchmark.yaml")
    OmegaConf.set_struct(base, False)
    base.methods = ["lime"]
    for base.xai_overrides, msg in ([{"ig": {"n_steps": 4}}, "must map benchmarked methods"],
                                    [{"lime": {"num_sample": 4}}, "keys of conf/xai/lime.yaml"]):
        with pytest.raises(HarnessError, match=msg):
            compose_methods(base)
    base.xai_overrides = {"lime": {"num_samples": 7}}
    node = compose_methods(base)["lime"]
    assert node.num_samples == 7 and node.seed == base.seed


class Counter:
    """Counts the images a model sees with gradients on (forward + backward passes) and off."""

    def __init__(self, model: nn.Module) -> None:
        self.forward = self.backward = 0
        model.register_forward_pre_hook(self)

    def __call__(self, _m, inp) -> None:
        if torch.is_grad_enabled():
            self.backward += len(inp[0])
        else:
            self.forward += len(inp[0])


COSTS = [  # (xai option, overrides, model)
    ("occlusion", [], "cnn"),
    ("occlusion", ["xai.patch=5", "xai.stride=3", "xai.batch_size=7"], "cnn"),  # border windows added
    ("occlusion", ["xai.patch=8", "xai.stride=8"], "vit"),
    ("kernelshap", ["xai.segmentation=grid", "xai.patch=16"], "cnn"),  # 4 cells: all 14 coalitions
    ("kernelshap", ["xai.segmentation=grid", "xai.n_samples=50", "xai.batch_size=16"], "cnn"),  # sampled
    ("kernelshap", ["xai.n_samples=40"], "cnn"),  # SLIC, sampled
    ("lime", ["xai.num_samples=40", "xai.batch_size=16"], "cnn"),
    pytest.param("partition_shap", ["xai.max_evals=60"], "cnn", marks=pytest.mark.slow),  # numba JIT: ~10 s
    ("ig", ["xai.n_steps=5", "xai.internal_batch_size=3"], "cnn"),
    ("smoothgrad", ["xai.n_samples=3"], "cnn"),
    ("saliency", [], "cnn"),
    ("ixg", [], "cnn"),
    ("gradcam", ["xai.layer=layer3"], "cnn"),
    ("rollout", [], "vit"),
    ("chefer", [], "vit"),
    ("freemcg", ["xai.n_particles=8"], "cnn"),
]


@pytest.mark.parametrize(("option", "overrides", "arch"), COSTS)
def test_model_cost_is_what_the_model_sees(option, overrides, arch):
    model = {"cnn": tiny_cnn, "vit": tiny_vit}[arch]()
    ex = instantiate(make_cfg([f"xai={option}", *overrides]).xai)
    x, t = images(2)
    count = Counter(model)
    ex(model, x, t)
    cost = ex.model_cost((32, 32))
    assert (count.forward / 2, count.backward / 2) == (cost.forward, cost.backward)


def test_freemcg_counts_its_denoiser_passes(tmp_path):
    """FreeMCG's raw cost includes the particles through its denoiser (the benchmark times them)."""
    ex = instantiate(make_cfg(["xai=freemcg", "xai.n_particles=8", f"paths.cache_dir={tmp_path}"]).xai)
    seen, inner = [], ex.denoiser
    ex.denoiser = lambda z, s: seen.append(len(z)) or inner(z, s)
    x, t = images(2)
    ex(tiny_cnn(), x, t)
    assert sum(seen) / 2 == ex.model_cost((32, 32)).denoiser == 8


def test_random_has_no_model_cost():
    assert instantiate(make_cfg(["xai=random"]).xai).model_cost((32, 32)) is None


@pytest.mark.parametrize(("option", "overrides"), [
    ("ig", ["xai.baseline=0.0"]), ("saliency", []), ("ixg", ["xai.baseline=0.0"]), ("gradcam", []),
    ("occlusion", ["xai.baseline=0.0"]),
    ("kernelshap", ["xai.segmentation=grid", "xai.patch=16"]),  # 4 cells: both exact Shapley values
])
def test_references_use_equal_settings(option, overrides):
    """Where the reference computes the same quantity, it gives our map: the settings match."""
    model = tiny_cnn()
    ex = instantiate(make_cfg([f"xai={option}", *overrides]).xai)
    x, t = images(2)
    label, fn = reference(ex, model, x)
    ours, ref = ex(model, x, t), np.asarray(fn(x, t))
    if option == "occlusion":
        ref = ref / 3  # captum credits each colour channel of the window
    np.testing.assert_allclose(ref, ours, rtol=1e-4, atol=1e-5 * np.abs(ours).max())


@pytest.mark.parametrize("option", ["random", "rollout", "chefer", "gradcam"])
def test_methods_without_reference_say_why(option):
    ex = instantiate(make_cfg([f"xai={option}"]).xai)
    with pytest.raises(NoReference, match=r"\w"):
        reference(ex, tiny_vit(), images(1)[0])


@pytest.mark.parametrize(("option", "overrides"), [
    ("lime", ["xai.num_samples=16"]), ("kernelshap", ["xai.segmentation=grid", "xai.patch=8", "xai.n_samples=40"]),
    pytest.param("partition_shap", ["xai.max_evals=16"], marks=pytest.mark.slow),
])
def test_perturbation_methods_are_timed_against_their_packages(option, overrides):
    from omegaconf import OmegaConf

    from harness.benchmark.core import bench_method

    ex = instantiate(make_cfg([f"xai={option}", *overrides]).xai)
    x, t = images(1)
    cfg = OmegaConf.create({"batch_size": 64, "repeats": 1, "reference": True})
    row = bench_method(option, ex, tiny_cnn(), x, t, cfg)
    assert row["status"] == "ok" and not row["reference"].startswith("n/a"), row
    assert all(row[k] > 0 and math.isfinite(row[k]) for k in ("s_per_image", "ratio_raw", "ratio_ref")), row


def test_metric_benchmark_command(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "harness.benchmark.metrics", *TINY_VIT, "dataset=shapes", "dataset.n=2",
                        "n_images=2", "repeats=1", "metric_names=[srg,pixel_flipping,max_sensitivity,sparseness,road]",
                        "metric_overrides={max_sensitivity:{nr_samples:2},road:{percentages:[50]}}",
                        f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["metric"]: row for row in csv.DictReader(open(out / "benchmark_metrics.csv"))}
    assert list(rows) == ["srg", "pixel_flipping", "max_sensitivity", "sparseness", "road"]
    assert rows["srg"]["model_cost"] == "128 fwd"  # 64 patches of 4x4: 65 MoRF points + 63 LeRF points
    assert rows["pixel_flipping"]["model_cost"] == "49 fwd" and rows["max_sensitivity"]["model_cost"] == "2 explanations"
    for m in ("srg", "pixel_flipping"):
        assert float(rows[m]["ratio_ref"]) > 0 and rows[m]["reference"].startswith("quantus.")
    for m in ("srg", "pixel_flipping", "max_sensitivity", "road"):
        assert float(rows[m]["ratio_raw"]) > 0
    assert rows["sparseness"]["ratio_raw"] == "" and rows["sparseness"]["model_cost"] == "0"
    assert "ratio a" in r.stdout and (out / "benchmark_metrics.md").exists()
    bad = subprocess.run([sys.executable, "-m", "harness.benchmark.metrics", "metric_names=[srg,nope]"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert bad.returncode == 1 and "unknown metric(s) 'nope'" in bad.stderr and "valid:" in bad.stderr


def test_sweep_benchmark_counts_what_each_run_computed(tmp_path, cache_dir, trained_vit):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "harness.benchmark.sweep", f"output_dir={tmp_path}/bench",
                        f"hydra.run.dir={tmp_path}/hydra",
                        f'sweep=["xai=random,saliency","prompt=paper,general_audience","dataset.n=2","paths.cache_dir={cache_dir}"]',
                        "repeats=1"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()
            if line.split() and line.split()[0] in ("predictions", "attributions", "answers")}
    # M=1 X=2 L=1 P=2 N=2: 2 predictions, 4 attributions, 8 answers; the second run computes nothing
    assert rows == {"predictions": ["2", "2", "0"], "attributions": ["4", "4", "0"], "answers": ["8", "8", "0"]}
    assert "run 2 0 new runs" in r.stdout and "ratio" in r.stdout
    fixed = {line.split("  ")[0].strip(): line for line in r.stdout.splitlines()}
    for row in ("fixed cost of a job, fresh process (wall - stage s)", "fixed cost per job inside the sweep (median)",
                "re-run of the finished sweep / first run", 're-run / python -c "import torch, mlflow"'):
        assert row in fixed, r.stdout
    assert "3 jobs" in fixed["fixed cost per job inside the sweep (median)"]  # 4 runs: 3 gaps between job ends
