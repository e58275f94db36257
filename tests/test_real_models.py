"""Every method that serves CNNs runs on the real trained classifiers in ../shared/data:
ResNet-20 on CIFAR-10 images and MobileNetV2 on ImageNet photos (maps at input resolution,
finite, not all zero)."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import make_cfg, needs_shared
from harness.xai.base import methods_for

# Fewer samples than the defaults: this checks that each method runs on real models, not quality
# (the tables in the issue notes measure that, with the defaults).
FAST = {"lime": ["xai.num_samples=64"], "kernelshap": ["xai.n_samples=64"], "partition_shap": ["xai.max_evals=64"],
        "smoothgrad": ["xai.n_samples=4"], "freemcg": ["xai.n_particles=16", "xai/denoiser=none"], "ig": ["xai.n_steps=8"]}
SETUPS = {"resnet20_cifar10": ["model=cifar_resnet20", "dataset=cifar10", "dataset.n=3"],
          "mobilenet_v2_imagenet": ["model=mobilenet_v2_imagenet", "dataset=imagenet_samples", "dataset.n=2"]}


@pytest.fixture(scope="module")
def setups():
    out = {}
    for name, overrides in SETUPS.items():
        cfg = make_cfg(overrides)
        data, model = instantiate(cfg.dataset), instantiate(cfg.model)
        x, _ = model.preprocess(data.images)
        out[name] = model, x, torch.from_numpy(data.labels)
    return out


@pytest.mark.real_data
@needs_shared
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("method", methods_for("cnn"))
def test_method_runs_on_real_model(setups, setup, method):
    model, x, y = setups[setup]
    maps = instantiate(make_cfg([f"xai={method}", *FAST.get(method, [])]).xai)(model, x, y)
    assert maps.shape == (len(x), *x.shape[-2:]) and np.isfinite(maps).all()
    assert (np.abs(maps).reshape(len(x), -1).max(1) > 0).all()
