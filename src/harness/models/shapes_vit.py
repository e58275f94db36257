"""A small network (a timm ViT; or any module by class path, e.g. a CIFAR ResNet) that the harness
trains on its own ``shapes`` data, cached by config hash.

The default experiment needs a classifier that makes real decisions without downloading weights:
this module trains one on first use (about 7 minutes on two CPU cores), reports its held-out
accuracy, and stores it under ``cache_dir/models/<hash>``, where the hash covers every argument
that changes the weights. Later runs, and every job of a sweep, load it from there.

The weights of the default config ship with the package (``weights/<name>-<hash>/``, trained by
this module with those settings on two CPU threads; ``tests/test_trained_model.py`` trains them
again and compares), so a new user's first command does not wait for training and reproduces the
published numbers exactly. ``shipped=false`` trains them here instead; any other config trains.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from harness.data.shapes import GENERATOR_VERSION, active_artifacts
from harness.models.classifier import Classifier
from harness.utils import config_hash, seeded, to_plain, trainer_lock

log = logging.getLogger(__name__)

# Bump when the training procedure changes in a way the arguments do not show.
TRAINING_VERSION = 2
SHIPPED = Path(__file__).resolve().parent / "weights"  # trained copies of the configs the project uses by default


def _data(
    train_data: dict[str, Any], n: int, split: str, seed_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    from harness.data.shapes import make_shapes

    kwargs = {k: v for k, v in train_data.items() if k not in ("_target_", "n", "split")}
    kwargs["seed"] = kwargs.get("seed", 0) + seed_offset
    s = make_shapes(n=n, split=split, **kwargs)
    x = torch.from_numpy(np.stack(s.images)).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.from_numpy(s.labels)


def _build(arch: str, model_kwargs: dict[str, Any], num_classes: int, image_size: int = 224) -> Classifier:
    from hydra.utils import get_class

    kwargs = dict(model_kwargs)
    if "." in arch:  # a dotted class path: any torch module taking num_classes, e.g. CifarResNet
        return Classifier(get_class(arch)(num_classes=num_classes, **kwargs), input_size=image_size)
    import timm

    if isinstance(kwargs.get("embed_layer"), str):  # dotted class path from the YAML
        kwargs["embed_layer"] = get_class(kwargs["embed_layer"])
    net = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    return Classifier(net, input_size=int(model_kwargs.get("img_size", image_size)))


@torch.no_grad()
def _accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model.predict(x).argmax(1) == y).float().mean())


def _train(model: Classifier, cfg: dict[str, Any]) -> dict[str, float]:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    xv, yv = _data(cfg["train_data"], cfg["n_val"], "val")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    steps_per_epoch = -(-cfg["n_train"] // cfg["batch_size"])
    total = cfg["epochs"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg["seed"])
    bar = tqdm(total=total, desc=f"training {_name(cfg['arch'])}", disable=None)
    for epoch in range(cfg["epochs"]):
        # Fresh images every epoch: the generator is cheap and the model never overfits.
        x, y = _data(cfg["train_data"], cfg["n_train"], "train", seed_offset=epoch)
        model.train()
        loss_sum, correct = 0.0, 0
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg["batch_size"]):
            idx = perm[i : i + cfg["batch_size"]]
            xb, yb = x[idx], y[idx]
            if cfg.get("flip", True):  # shapes are symmetric under flips: free augmentation
                flip = torch.rand(len(xb), generator=gen) < 0.5
                xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb, label_smoothing=cfg["label_smoothing"])
            loss_sum += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        elapsed = time.perf_counter() - t0  # a line per epoch reaches the job's log, terminal or not
        log.info("training epoch %d/%d: loss %.3f, training accuracy %.3f, %.0f s, about %.0f s left", epoch + 1,
                 cfg["epochs"], loss_sum / len(x), correct / len(x), elapsed, elapsed / (epoch + 1) * (cfg["epochs"] - epoch - 1))
    bar.close()
    model.eval()
    return {
        "val_accuracy": _accuracy(model, xv, yv),
        "train_accuracy": _accuracy(model, x[:1000], y[:1000]),
        "train_seconds": time.perf_counter() - t0,
    }


def _name(arch: str) -> str:
    """The cache folder's prefix: ``vit_tiny_shapes`` for a timm ViT (the shipped weights' name),
    ``<class>_shapes`` for a dotted class path."""
    return f"{arch.rsplit('.', 1)[-1].lower()}_shapes" if "." in arch else "vit_tiny_shapes"


def _install_shipped(source: Path, folder: Path) -> None:
    """Copy the shipped weights and their metadata into the cache folder (each file put in place
    by a rename, so a reader never sees half a file)."""
    import shutil

    for name in ("meta.json", "model.pt"):  # model.pt last: its presence means complete
        tmp = folder / f".{name}.tmp"
        shutil.copyfile(source / name, tmp)
        os.replace(tmp, folder / name)
    log.info("using the shipped weights of this config (%s; trained by the harness with exactly these "
             "settings; model.shipped=false trains them here instead)", source.name)


def shapes_vit(
    cache_dir: str,
    arch: str = "vit_tiny_patch16_224",
    model_kwargs: dict[str, Any] | None = None,
    train_data: dict[str, Any] | None = None,
    n_train: int = 4000,
    n_val: int = 1000,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 1.5e-3,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.0,
    seed: int = 0,
    flip: bool = True,
    device: str = "cpu",
    shipped: bool = True,
) -> Classifier:
    """Load the ViT trained with these settings from the cache, training it first if needed.

    Args:
        cache_dir: root of the harness cache; the model lands in ``models/<hash>/`` under it.
        arch: timm architecture name, built without pretrained weights; or the dotted path of a
            module class built as ``cls(num_classes=..., **model_kwargs)`` at the data's size.
        model_kwargs: overrides for ``timm.create_model`` (img_size, patch_size, depth, ...).
        train_data: arguments of :func:`harness.data.shapes.make_shapes` for the training data
            (``n`` and ``split`` are set here: ``n_train`` from ``train``, ``n_val`` from ``val``).
        n_train: number of training images, generated afresh for every epoch.
        n_val: number of held-out images (the ``val`` split, never trained on).
        epochs, batch_size, lr, weight_decay: AdamW with a one-cycle schedule.
        label_smoothing: of the cross-entropy loss (it shrinks logit gaps, hence SRG scales).
        seed: seeds initialisation and batch order.
        flip: random horizontal flips during training.
        device: where the returned model lives (training runs on it too).
        shipped: use the weights shipped with the package when they are of exactly this config
            (see the module docstring); false: train them here.
    """
    train_data = active_artifacts(
        {k: v for k, v in (to_plain(train_data) or {}).items() if k not in ("_target_", "n", "split")})
    cfg = to_plain(
        dict(
            arch=arch, model_kwargs=model_kwargs or {}, train_data=train_data,
            n_train=n_train, n_val=n_val, epochs=epochs, batch_size=batch_size, lr=lr,
            weight_decay=weight_decay, label_smoothing=label_smoothing, seed=seed, flip=flip, version=TRAINING_VERSION,
            data_version=GENERATOR_VERSION,
        )
    )
    classes = cfg["train_data"].get("classes", ["circle", "square", "triangle", "cross"])
    folder = Path(cache_dir) / "models" / f"{_name(arch)}-{config_hash(cfg)}"
    folder.mkdir(parents=True, exist_ok=True)
    weights, meta_path = folder / "model.pt", folder / "meta.json"
    with trainer_lock(folder, "model"):
        # the initial weights must not depend on what ran before, nor what runs after on whether
        # the model was trained or loaded: seeded for this block only
        if shipped and not weights.exists() and (SHIPPED / folder.name / "model.pt").is_file():
            _install_shipped(SHIPPED / folder.name, folder)
        with seeded(seed):
            model = _build(arch, cfg["model_kwargs"], len(classes), int(cfg["train_data"].get("image_size", 32)))
            if weights.exists() and meta_path.exists():
                model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
                meta = json.loads(meta_path.read_text())
            else:
                log.info("training %s (first use of this config) into %s", _name(arch), folder)
                model.to(device)
                meta = _train(model, cfg)
                log.info("trained in %.0f s, held-out accuracy %.3f", meta["train_seconds"], meta["val_accuracy"])
                tmp = folder / "model.pt.tmp"
                torch.save(model.state_dict(), tmp)
                os.replace(tmp, weights)
                meta_path.write_text(json.dumps({**meta, "config": cfg}, indent=2))
    model.info = {k: float(v) for k, v in meta.items() if isinstance(v, (int, float))}
    return model.to(device).eval()


def shapes_cnn(
    cache_dir: str,
    arch: str = "harness.models.cifar_resnet.CifarResNet",
    model_kwargs: Mapping[str, Any] = MappingProxyType({"depth": 8}),
    train_data: dict[str, Any] | None = None,
    n_train: int = 4000,
    n_val: int = 1000,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.0,
    seed: int = 0,
    flip: bool = False,
    device: str = "cpu",
    shipped: bool = False,
) -> Classifier:
    """``model=resnet_shapes``: :func:`shapes_vit`'s training and cache for a CNN, by default a
    CIFAR ResNet-8 (He et al. 2016; any module class by dotted path, built with ``num_classes``),
    10 epochs of AdamW at 3e-3, no flips (a planted artifact keeps its place), nothing shipped."""
    return shapes_vit(cache_dir, arch=arch, model_kwargs=dict(model_kwargs), train_data=train_data, n_train=n_train,
                      n_val=n_val, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      label_smoothing=label_smoothing, seed=seed, flip=flip, device=device, shipped=shipped)
