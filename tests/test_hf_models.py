"""model=hf and model=torchvision on tiny random models built from configs: the logits equal the
library's own forward on its own preprocessing, a ViT/DeiT runs as the identical timm ViT, every
XAI method works or refuses before any work, and a whole job runs saliency and SRG."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from conftest import make_cfg
from harness.components import check_capabilities
from harness.data.shapes import make_shapes
from harness.models.hf import hf_model
from harness.types import HarnessError
from test_xai_suite import FAST, XAI
from harness.tracking.mlflow_tracker import run_summary

pytestmark = pytest.mark.filterwarnings("ignore")

TINY_VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "num_labels": 3}


def _build(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "vit":
        return tf.ViTForImageClassification(tf.ViTConfig(**TINY_VIT)), tf.ViTImageProcessor(size={"height": 32, "width": 32})
    if kind == "deit":  # no processor saved: config.image_size and the processor class's defaults
        return tf.DeiTForImageClassification(tf.DeiTConfig(**TINY_VIT)), None
    if kind == "resnet":
        return (tf.ResNetForImageClassification(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                                num_labels=3)),
                tf.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875))
    if kind == "convnext":
        return (tf.ConvNextForImageClassification(tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                                    num_labels=3, image_size=32)),
                tf.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875))
    if kind == "swin":
        return (tf.SwinForImageClassification(tf.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1],
                                                            num_heads=[1, 2], window_size=4, num_labels=3)),
                tf.ViTImageProcessor(size={"height": 32, "width": 32}))
    raise KeyError(kind)


KINDS = ("vit", "deit", "resnet", "convnext", "swin")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny model saved as a user's save_pretrained folder (with its processor where given)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in KINDS:
        model, proc = _build(kind)
        model.save_pretrained(root / kind)
        if proc is not None:
            proc.save_pretrained(root / kind)
        out[kind] = (root / kind, model.eval(), proc)
    return out


def images(n: int = 3, size: int = 32) -> list[np.ndarray]:
    return make_shapes(n=n, image_size=size, seed=3).images


@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_the_hugging_face_forward(folders, kind):
    """Images already at the processor's size: the harness's logits are the HF model's on the
    HF processor's pixel values (ViT/DeiT through the timm form, the others as they are)."""
    path, hf, proc = folders[kind]
    clf = hf_model(str(path))
    assert type(clf.net).__name__ == ("VisionTransformer" if kind in ("vit", "deit") else "HFLogits")
    ims = images(size=clf.input_size)
    x, _ = clf.preprocess(ims)
    if proc is not None and kind in ("vit", "swin"):  # square resize to 32: nothing to resize
        pv = proc(images=[Image.fromarray(im) for im in ims], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close((x - clf.mean) / clf.std, pv, atol=1e-5, rtol=0)
    else:
        pv = (x - clf.mean) / clf.std
    with torch.no_grad():
        ref = hf(pixel_values=pv).logits
    torch.testing.assert_close(clf.predict(x), ref, atol=1e-5, rtol=1e-5)


def test_preprocessing_comes_from_the_folder_then_the_config(folders, caplog):
    with caplog.at_level(logging.INFO, logger="harness.models.hf"):
        vit = hf_model(str(folders["vit"][0]))
        deit = hf_model(str(folders["deit"][0]))
        conv = hf_model(str(folders["convnext"][0]))
    assert vit.input_size == 32 and vit.resize is None and "preprocessor_config.json" in vit.sources["input_size"]
    assert deit.input_size == 32 and deit.sources["input_size"] == "config.image_size"
    assert "DeiTImageProcessor" in deit.sources["mean"]  # the class's defaults where the folder has none
    # ConvNeXt's rule below 384 px: shorter side to 32 / 0.875, crop 32
    assert (conv.input_size, conv.resize, conv.interpolation) == (32, 36, "bicubic")
    assert "as a timm ViT" in caplog.text and "resize=36" in caplog.text
    assert hf_model(str(folders["vit"][0]), input_size=32, mean=[0, 0, 0]).sources["mean"] == "model.mean"


def test_a_fixed_size_vit_refuses_another_input_size(folders):
    with pytest.raises(HarnessError, match=r"takes 32 px inputs only: set model.input_size=32"):
        hf_model(str(folders["vit"][0]), input_size=48)


def test_as_timm_choices(folders):
    kept = hf_model(str(folders["vit"][0]), as_timm=False)
    assert type(kept.net).__name__ == "HFLogits"
    with pytest.raises(HarnessError, match=r"model.as_timm=true: ResNetForImageClassification has no one-to-one"):
        hf_model(str(folders["resnet"][0]), as_timm=True)
    with pytest.raises(HarnessError, match=r"model.as_timm='yes' is not valid; valid: auto, true, false"):
        hf_model(str(folders["vit"][0]), as_timm="yes")


def test_missing_folder_and_offline_hub_name_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(HarnessError, match=r"could not be loaded from the hub.*save_pretrained.*HF_HOME"):
        hf_model("google/vit-base-patch16-224")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarnessError, match=r"is not a model folder \(no config.json\)"):
        hf_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("kind", [*KINDS, "torchvision"])
def test_every_method_works_or_refuses_before_any_work(folders, kind):
    """Each xai option on each model: maps of the right shape, or a refusal from the capability
    check that runs before the data and predictions; never a late error or a crash."""
    from harness.models.builders import torchvision_model

    torch.manual_seed(0)
    clf = (torchvision_model("resnet18", num_classes=3, input_size=32) if kind == "torchvision"
           else hf_model(str(folders[kind][0])))
    x = torch.from_numpy(np.stack(images(2))).permute(0, 3, 1, 2).float() / 255
    t = torch.tensor([0, 2])
    served, refused = [], []
    for option in XAI:
        ex = instantiate(make_cfg([f"xai={option}", *FAST.get(option, [])]).xai)
        try:
            check_capabilities(ex, clf)
        except HarnessError as e:
            assert "does not serve this model" in str(e)
            refused.append(option)
            continue
        a = ex(clf, x, t)
        assert a.shape == (2, 32, 32) and np.isfinite(a).all(), option
        served.append(option)
    vit_only = {"rollout", "chefer", "attnlrp", "cplrp"}
    if kind in ("vit", "deit"):
        assert vit_only <= set(served) and "lrp" in refused
    else:
        assert vit_only <= set(refused) and ("lrp" in served) == (kind == "torchvision")
    assert {"saliency", "ig", "smoothgrad", "gradcam", "occlusion", "lime", "partition_shap"} <= set(served)


def test_deit_distillation_token_is_a_prefix_token(folders):
    clf = hf_model(str(folders["deit"][0]))
    assert clf.net.num_prefix_tokens == 2 and clf.net.reg_token is not None


@pytest.mark.parametrize("model", ["hf", "torchvision"])
def test_a_job_runs_saliency_and_srg(folders, tmp_path, model):
    from mlflow import MlflowClient

    from harness.pipeline import run

    extra = ([f"model.path={folders['convnext'][0]}"] if model == "hf" else
             ["model.name=resnet18", "model.num_classes=3", "model.input_size=32", "model.resize=null"])
    cfg = make_cfg([f"model={model}", *extra, "dataset=shapes", "dataset.n=3", "xai=saliency", "metrics=[srg]",
                    "metrics.srg.steps=4", "~mllm", "isolation=never", "resume=false", "cache.dir=null",
                    f"paths.cache_dir={tmp_path}/cache", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                    f"tracking.artifact_location={tmp_path}/a", "experiment_name=own-models"])
    summary = run(cfg, {"tags": {}, "choices": {"model": model}, "output_dir": None})
    assert np.isfinite(summary["srg"])
    (r,) = MlflowClient(f"sqlite:///{tmp_path}/m.db").search_runs(["1"])
    assert r.info.status == "FINISHED" and "srg" in run_summary(r)


@pytest.mark.parametrize("kind", ["vit", "convnext"])
def test_resizing_matches_the_processor(folders, kind):
    """Images of other sizes (one not square): the harness's resize and crop give the HF
    processor's pixel values to within one grey level (the processors round once more)."""
    from transformers import AutoImageProcessor

    path = folders[kind][0]
    clf, proc = hf_model(str(path)), AutoImageProcessor.from_pretrained(str(path))
    rng = np.random.default_rng(0)
    for im in (rng.integers(0, 255, (57, 45, 3), dtype=np.uint8), images(1, size=64)[0]):
        x, _ = clf.preprocess([im])
        pv = proc(images=[Image.fromarray(im)], return_tensors="pt")["pixel_values"]
        diff = ((x - clf.mean) / clf.std - pv).abs()
        assert diff.max() <= (1 / 255) / float(clf.std.min()) + 1e-6 and diff.mean() < 1e-3, kind
