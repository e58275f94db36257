"""Every option of every config group composes and builds; the CLI explains itself."""

from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from conftest import SHARED, make_cfg, run_harness
from harness import CONF_DIR

GROUPS = ("dataset", "model", "xai", "metrics", "tracking")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_options_and_help_lists_them():
    r = run_harness("--help")
    assert r.returncode == 0
    for group in GROUPS:
        assert options(group), group
        assert f"{group}: {', '.join(options(group))}" in r.stdout
    assert "hydra/launcher" in r.stdout and "joblib" in r.stdout


def test_wrong_option_lists_the_valid_ones():
    r = run_harness("xai=nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"harness: error: xai=nope is not an option of xai: valid: {', '.join(options('xai'))}"


def test_a_nested_group_set_to_null_says_how_to_drop_it():
    r = run_harness("xai=freemcg", "xai/denoiser=null")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "xai/denoiser=null: a config group is dropped with ~xai/denoiser (or its option none)" in r.stderr


@pytest.mark.parametrize("arg, line", [
    ("xai=shapp", "xai=shapp is not an option of xai: did you mean shap?"),
    ("-m xai=lime,shapp,attnlrp", "xai=shapp is not an option of xai: did you mean shap?"),
    ("metrics=[srg,pointing_gme]", "metrics=pointing_gme is not an option of metrics: did you mean pointing_game?"),
    ("experiment=ofline_demo", "experiment=ofline_demo is not an option of experiment: did you mean offline_demo?"),
    ("+model=vit_tiny_shape", "model=vit_tiny_shape is not an option of model: did you mean vit_tiny_shapes?"),
    ("xai=freemcg xai/denoiser=ddpm_shape", "xai/denoiser=ddpm_shape is not an option of xai/denoiser: did you mean "
                                            "ddpm_shapes?"),
])
def test_a_misspelt_option_gets_the_nearest_one(arg, line):
    r = run_harness(*arg.split())
    assert r.returncode == 2 and f"harness: error: {line} valid: " in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("option", options("xai"))
def test_xai_options_build(option):
    ex = instantiate(make_cfg([f"xai={option}"]).xai)
    assert callable(ex) and isinstance(ex.needs_gradients, bool)


@pytest.mark.parametrize("option", options("metrics"))
def test_metric_options_build(option):
    cfg = make_cfg([f"metrics=[{option}]"])
    (metric,) = [instantiate(m) for m in cfg.metrics.values()]
    assert isinstance(metric.higher_is_better, bool) and metric.family


@pytest.mark.parametrize("option", options("tracking"))
def test_tracking_options_build(option, tmp_path):
    tracker = instantiate(make_cfg([f"tracking={option}", f"paths.root_dir={tmp_path}"]).tracking)
    assert tracker.uri.startswith("sqlite:///" if option == "local" else "http://127.0.0.1")


def _dataset_overrides(option: str, tmp_path: Path) -> list[str]:
    if option == "image_folder":
        (tmp_path / "cls").mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "cls" / "x.png")
        return [f"dataset.root={tmp_path}"]
    if option == "npz":
        np.savez(tmp_path / "d.npz", images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([0, 1]))
        return [f"dataset.path={tmp_path / 'd.npz'}"]
    if option == "hf":  # an image folder through the datasets imagefolder builder
        (tmp_path / "img" / "cls").mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img" / "cls" / "x.png")
        return [f"dataset.path={tmp_path / 'img'}", f"dataset.cache_dir={tmp_path / 'cache'}"]
    if option in ("cifar10", "imagenet_samples") and not SHARED.is_dir():
        pytest.skip(f"real test data not found at {SHARED}")
    return [f"paths.shared_data={SHARED}"]


@pytest.mark.parametrize("option", options("dataset"))
def test_dataset_options_build(option, tmp_path):
    data = instantiate(make_cfg([f"dataset={option}", *_dataset_overrides(option, tmp_path)]).dataset)
    assert len(data) > 0 and data.images[0].dtype == np.uint8 and data.class_names


@pytest.mark.parametrize("option", options("model"))
def test_model_options_build(option, cache_dir, trained_vit, tmp_path):
    if option in ("cifar_resnet20", "mobilenet_v2_imagenet") and not SHARED.is_dir():
        pytest.skip(f"real test data not found at {SHARED}")
    if option == "hf":  # a tiny ViT as a user's save_pretrained folder
        import transformers

        transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, num_labels=3)).save_pretrained(tmp_path / "vit")
    extra = {"timm": ["model.name=vit_tiny_patch16_224", "model.num_classes=3"],
             "hf": [f"model.path={tmp_path / 'vit'}"],
             "vit_b16_imagenet": ["model.pretrained=false"],  # no hub weights here
             "resnet_shapes": ["model.epochs=1"]}.get(option, [])  # builds and trains as configured, briefly
    cfg = make_cfg([f"model={option}", f"paths.cache_dir={cache_dir}", f"paths.shared_data={SHARED}", *extra])
    model = instantiate(cfg.model)
    x, _ = model.preprocess([np.zeros((40, 50, 3), np.uint8)])
    assert model.predict(x).ndim == 2


def test_shortcut_experiment_composes_its_jobs():
    """experiments/experiment/shortcut.yaml: the mark's box, and the same test images with and without the
    mark (its sweep's dataset.spurious_prob values 1.0 and 1e-9)."""
    sets = {}
    for train, test in (("0.0", "1.0"), ("1.0", "1e-9")):
        cfg = make_cfg(["experiment=shortcut", f"model.train_data.spurious_prob={train}",
                        f"dataset.spurious_prob={test}", "xai=gradcam"])
        assert cfg.experiment_name == "shortcut"
        assert cfg.run_name == f"gradcam.train_mark_{train}.test_mark_{float(test)}"
        metrics = {name: instantiate(m) for name, m in cfg.metrics.items()}
        assert metrics["region_mass"].box == (0, 0, 3, 3) and "relevance_mass_accuracy" in metrics
        assert instantiate(cfg.text_metrics.grounding).box == (0, 0, 3, 3)
        sets[test] = instantiate(cfg.dataset)
    marked, clean = sets["1.0"], sets["1e-9"]
    np.testing.assert_array_equal(marked.labels, clean.labels)
    for a, b in zip(marked.images, clean.images):
        assert (a[3:] == b[3:]).all() and (a[:, 3:] == b[:, 3:]).all()  # the same image outside the mark
        assert (a[:3, :3] == a[0, 0]).all() and (a[:3, :3] != b[:3, :3]).any()  # the mark, and no mark
