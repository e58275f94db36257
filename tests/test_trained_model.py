"""The default model: trained by the harness, shipped as trained, reaching its accuracy, and the
explanation methods beat the random control on it."""

import functools

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import make_cfg
from harness.evaluation.stage import evaluate
from harness.xai.stage import explain
from harness.xai.base import methods_for

# Grad-CAM (on the 8x8 token grid of this 4-block ViT) and SmoothGrad beat random on some trainings
# of the default model and not on others: trainings are bit-identical on one machine but differ
# between CPUs, and the model trained here with 2 threads gave SRG gaps over random of -0.30 ± 0.16
# (Grad-CAM) and 0.00 ± 0.13 (SmoothGrad) on 256 images, at this commit and at the one before the
# job-engine work alike. The claim below is kept for the methods for which it held on every model
# trained so far (on this and earlier CI machines).
NOT_ON_EVERY_TRAINING = {"gradcam", "smoothgrad"}
METHODS = [m for m in methods_for("vit") if m != "random" and m not in NOT_ON_EVERY_TRAINING]
# Fewer perturbation samples than the defaults keep the suite fast; they still must beat random.
FAST = {"lime": ["xai.num_samples=150"], "kernelshap": ["xai.n_samples=150"],
        "partition_shap": ["xai.max_evals=150"]}


@pytest.mark.slow  # about 4-7 min on 2 cores: the ViT trained from scratch
def test_training_reproduces_the_shipped_weights(tmp_path):
    """The shipped weights are what training the default config produces: trained again here from
    scratch (shipped=false), the weights are bit-identical on a machine like the one that trained
    them (2 CPU threads); elsewhere floating-point order may differ, and then the model must
    still be as accurate (within 2 points on 1000 held-out images) and agree on 97 % of them."""
    from harness.cache import model_digest
    from harness.models.shapes_vit import SHIPPED

    cfg = make_cfg([f"paths.cache_dir={tmp_path}"])
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as the shipped weights were trained: the same floating-point order
    try:
        fresh = instantiate(cfg.model, shipped=False)
    finally:
        torch.set_num_threads(before)
    shipped = instantiate(make_cfg([f"paths.cache_dir={tmp_path / 'shipped'}"]).model)
    assert (SHIPPED / next((tmp_path / "shipped" / "models").iterdir()).name / "model.pt").is_file()
    if model_digest(fresh) != model_digest(shipped):
        data = instantiate(make_cfg(["dataset.n=1000", "dataset.split=val"]).dataset)
        x, _ = fresh.preprocess(data.images)
        a, b = fresh.predict(x).argmax(1).numpy(), shipped.predict(x).argmax(1).numpy()
        assert abs((a == data.labels).mean() - (b == data.labels).mean()) <= 0.02 and (a == b).mean() >= 0.97
        pytest.skip(f"trained weights differ from the shipped ones on this CPU (torch {torch.__version__}, "
                    "2 threads), within the stated tolerance")


def test_training_logs_each_epoch_and_caches(tmp_path, caplog):
    """The training path on a tiny config: a progress line per epoch, then the cache."""
    import logging

    from harness.models.shapes_vit import shapes_vit

    tiny = dict(model_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
                epochs=2, n_train=128, n_val=32, batch_size=64)
    with caplog.at_level(logging.INFO, logger="harness.models.shapes_vit"):
        first = shapes_vit(str(tmp_path), **tiny)
    assert "training epoch 1/2: loss" in caplog.text and "training epoch 2/2" in caplog.text and "left" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="harness.models.shapes_vit"):
        again = shapes_vit(str(tmp_path), **tiny)
    assert "training epoch" not in caplog.text and again.info == first.info


def test_trained_vit_accuracy_and_cache(trained_vit, cache_dir):
    assert trained_vit.info["val_accuracy"] >= 0.9
    assert trained_vit.info["train_seconds"] > 0  # recorded (how long depends on the machine)
    # A fresh, never-seen split scores like the held-out one.
    data = instantiate(make_cfg(["dataset.n=300", "dataset.seed=123"]).dataset)
    x, _ = trained_vit.preprocess(data.images)
    assert float((trained_vit.predict(x).argmax(1).numpy() == data.labels).mean()) >= 0.88
    # Second build: read from the cache, same weights, no training.
    again = instantiate(make_cfg([f"paths.cache_dir={cache_dir}"]).model)
    assert again.info == trained_vit.info
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), trained_vit.state_dict().values()))


@pytest.fixture(scope="module")
def scores(trained_vit):
    """Per-image SRG and pointing-game scores of a method on 256 test images (memoised)."""
    cfg = make_cfg(["dataset.n=256", "metrics=[srg,pointing_game]"])
    data = instantiate(cfg.dataset)
    x, masks = trained_vit.preprocess(data.images, data.masks)
    y = torch.from_numpy(data.labels)
    metrics = {k: instantiate(v) for k, v in cfg.metrics.items()}

    @functools.cache
    def of(method: str) -> dict[str, np.ndarray]:
        maps = explain(instantiate(make_cfg([f"xai={method}", *FAST.get(method, [])]).xai), trained_vit, x, y, 64)
        return {k: v for r in evaluate(metrics, trained_vit, x, maps, y, masks).values()
                for k, v in r.scores.items()}

    return of


# The perturbation and diffusion methods take 1-4 min each on 256 images (freemcg 250 s, partition_shap
# 76 s, lime 70 s, kernelshap 58 s on 2 cores): their claim runs with -m slow, the other methods' here.
SLOW = {"freemcg", "partition_shap", "lime", "kernelshap"}


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in METHODS])
def test_method_beats_random_on_srg(scores, method):
    gap = scores(method)["srg"] - scores("random")["srg"]  # paired per image
    assert gap.mean() > 2 * gap.std(ddof=1) / np.sqrt(len(gap)), gap.mean()


def test_ig_clearly_beats_random_on_srg_and_pointing_game(scores):
    gap = scores("ig")["srg"] - scores("random")["srg"]
    assert gap.mean() > 3 * gap.std(ddof=1) / np.sqrt(len(gap))
    assert abs(scores("random")["srg"].mean()) < scores("ig")["srg"].mean() / 4
    assert scores("ig")["pointing_game"].mean() > scores("random")["pointing_game"].mean() + 0.3
