"""python -m harness.check: the first command with a new model and data, run as a user runs it."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT

TINY_VIT = ["model=timm", "model.name=vit_tiny_patch16_224", "model.num_classes=4",
            *(f"model.kwargs.{k}" for k in ("img_size=32", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2"))]


def run_check(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "harness.check", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_the_report_of_a_model_and_its_data(tmp_path):
    r = run_check(*TINY_VIT, "dataset=shapes", "dataset.n=24", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "model=timm, dataset=shapes" in out
    assert "preprocess input_size=32, resize=None (model.kwargs.img_size)" in out  # where each setting came from
    assert "data       24 images, sizes 32x32 (24)" in out
    assert "4 class names (circle, square, triangle, cross), 4 labels present, the model has 4 outputs" in out
    acc = float(out.split("accuracy   ")[1].split(" %")[0])
    assert 0 <= acc <= 100 and "on 24 images" in out and "images/s forward" in out
    served = out.split("serve this model: ")[1].splitlines()[0].split(", ")
    assert {"rollout", "attnlrp", "saliency", "ig"} <= set(served) and "lrp" not in served
    assert "lrp: LRP does not serve this model" in out
    assert not list(tmp_path.iterdir())  # nothing written, no store


def test_images_cropped_at_their_own_size_and_classes_beyond_the_outputs(tmp_path):
    """Images at the network's size that preprocessing resizes and crops, and labels the model
    has no output for: a warning naming the setting each, and exit 1 for the second."""
    for i in range(6):
        (tmp_path / f"c{i}").mkdir()
        Image.fromarray(np.full((224, 224, 3), 40 * i, np.uint8)).save(tmp_path / f"c{i}" / "x.png")
    r = run_check("model=timm", "model.name=resnet18", "model.num_classes=4", "dataset=image_folder",
                  f"dataset.root={tmp_path}", "~mllm")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "resize=235 (crop_pct 0.95 of timm's pretrained_cfg of resnet18)" in r.stdout
    assert "set model.resize=null to feed them as they are" in r.stdout
    assert "labels go up to 5 but the model has 4 outputs" in r.stdout
    assert "rollout: AttentionRollout does not serve this model (ResNet, not a timm ViT)" in r.stdout


def test_a_bad_option_is_one_line():
    r = run_check("model=timn")
    assert r.returncode == 2 and "model=timn is not an option of model: did you mean timm?" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_check("-m", "xai=ig,lime")
    assert r.returncode == 2 and "drop -m" in r.stderr


def test_small_images_enlarged_for_the_network_are_named(capsys):
    from harness.check import check, compose_job

    cfg, choices = compose_job(["model=timm", "model.name=resnet18", "model.num_classes=4", "dataset=shapes",
                                "dataset.n=4", "~mllm"])
    assert check(cfg, choices) == 0
    out = capsys.readouterr().out
    assert "the images are at most 32 px and preprocessing enlarges them to 235 px" in out
    assert "set model.input_size=32 (and model.resize=null)" in out
