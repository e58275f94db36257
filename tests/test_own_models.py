"""Your own timm or torchvision model, as a user brings it: constructor arguments as plain keys,
a checkpoint with a wrapper's key prefix renamed by ``model.key_map``, preprocessing from the
checkpoint's metadata (config.json, timm's training ``args``, safetensors metadata), the
network's built size or the library's default, with the same pixels as the library's own eval
transform; clear errors for what does not fit. Offline, tiny models, one thread."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from conftest import make_cfg, run_harness
from PIL import Image

from harness.components import build
from harness.data.shapes import make_shapes
from harness.models.builders import timm_model, torchvision_model
from harness.types import HarnessError
from harness.validate import open_keys

LOGGER = "harness.models.builders"
# a ViT small enough to train in a second: 32 px images, 8 px patches, 2 blocks
VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
VIT_KEYS = [f"model.kwargs.{k}={v}" for k, v in VIT.items()]
# the class-coloured corner mark (one patch) makes the task learnable in a few steps
SHAPES = {"image_size": 32, "seed": 0, "spurious_prob": 1.0, "spurious_size": 8}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def to_tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def random_images(*shapes: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Smooth colour images (noise blurred by an upscale) of the given (height, width)."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in shapes:
        small = Image.fromarray(rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8))
        noisy = np.asarray(small.resize((w, h), Image.BILINEAR)).astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
        out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return out


def normalised(clf, x: torch.Tensor) -> torch.Tensor:
    return (x - clf.mean) / clf.std


def tiny_timm_resnet(num_classes: int = 3) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=num_classes)


# 1. a timm ViT of your own: built at 32 px, trained, saved under a wrapper's prefix, loaded as typed


def test_own_vit_checkpoint_through_the_config_predicts_as_timm_does(tmp_path):
    import timm
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", num_classes=4, **VIT)
    train = make_shapes(n=256, split="train", **SHAPES)
    cfg = net.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x, y = (to_tensor(train.images) - mean) / std, torch.from_numpy(train.labels)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(150):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    # as a training script wraps it: DataParallel around a module holding the network as .backbone
    path = tmp_path / "vit_shapes.pth"
    torch.save({"state_dict": {f"module.backbone.{k}": v for k, v in net.state_dict().items()}, "epoch": 1}, path)

    model_cfg = make_cfg(["model=timm", "model.name=vit_tiny_patch16_224", *VIT_KEYS, "model.num_classes=4",
                          f"model.checkpoint={path}", "model.key_map=[['^backbone\\.','']]"]).model
    assert [list(p) for p in model_cfg.key_map] == [["^backbone\\.", ""]]  # one backslash: the regex \.
    assert dict(model_cfg.kwargs) == VIT
    clf = build(model_cfg)
    assert clf.input_size == 32 and clf.resize is None
    assert clf.sources["input_size"] == "model.kwargs.img_size"
    assert clf.interpolation == cfg["interpolation"] and clf.mean.flatten().tolist() == list(cfg["mean"])
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), clf.net.state_dict().values()))

    test = make_shapes(n=96, split="test", **SHAPES)
    xh, _ = clf.preprocess(test.images)
    ours = clf.predict(xh)
    # the user's direct timm forward: timm's eval transform, at the size the network was built for
    data_cfg = {**resolve_data_config({}, model=net), "input_size": (3, 32, 32), "crop_pct": 1.0}
    transform = create_transform(**data_cfg)
    with torch.no_grad():
        ref = net(torch.stack([transform(Image.fromarray(im)) for im in test.images]))
    acc_ours = float((ours.argmax(1).numpy() == test.labels).mean())
    acc_ref = float((ref.argmax(1).numpy() == test.labels).mean())
    # trained, not random: above chance (0.25) by more than 4 standard errors of 96 images; the
    # accuracy itself varies with the CPU's floating-point kernels (0.5625 on one machine, above 0.6 on another)
    assert acc_ours == acc_ref > 0.25 + 4 * (0.25 * 0.75 / len(test.labels)) ** 0.5
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# 2. the harness's pixels are the library's eval transform's pixels


IMAGE_SHAPES = [(300, 200), (199, 257), (120, 90), (235, 235)]  # (height, width): taller, wider, smaller, square


def test_timm_preprocessing_equals_timms_eval_transform():
    from timm.data import create_transform, resolve_data_config

    clf = timm_model("resnet18", num_classes=3)
    data_cfg = resolve_data_config({}, model=clf.net)
    assert (data_cfg["interpolation"], data_cfg["crop_pct"]) == ("bicubic", 0.95)
    assert clf.resize == math.floor(224 / 0.95) and clf.interpolation == "bicubic"
    transform = create_transform(**data_cfg)
    images = random_images(*IMAGE_SHAPES)
    x, _ = clf.preprocess(images)
    ref = torch.stack([transform(Image.fromarray(im)) for im in images])
    assert x.shape == ref.shape == (len(images), 3, 224, 224)
    torch.testing.assert_close(normalised(clf, x), ref, rtol=0, atol=2e-6)


def test_torchvision_preprocessing_equals_resize_and_center_crop():
    from torchvision import transforms as T

    clf = torchvision_model("resnet18", num_classes=3)
    assert (clf.input_size, clf.resize, clf.interpolation) == (224, 256, "bilinear")
    assert clf.sources["input_size"] == "the ImageNet evaluation default"
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    images = random_images(*IMAGE_SHAPES, seed=1)
    x, _ = clf.preprocess(images)
    ref = torch.stack([transform(Image.fromarray(im)) for im in images])
    torch.testing.assert_close(normalised(clf, x), ref, rtol=0, atol=2e-6)


# 3. another resolution than the network's: a warning, or an error where the network cannot take it


def test_resolution_warning_and_fixed_size_error(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        timm_model("resnet18", num_classes=3)
        timm_model("vit_tiny_patch16_224", num_classes=4, kwargs=VIT)
    assert not [r for r in caplog.records if r.name == LOGGER], caplog.text
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        clf = timm_model("resnet18", num_classes=3, input_size=160)
    (rec,) = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert "160 px" in rec.getMessage() and "built for 224 px" in rec.getMessage()
    assert clf.input_size == 160 and clf.sources["input_size"] == "model.input_size"
    with pytest.raises(HarnessError, match=re.escape("set model.input_size=32")):
        timm_model("vit_tiny_patch16_224", num_classes=4, input_size=48, kwargs=VIT)


# 4. preprocessing the checkpoint records


PRETRAINED_CFG = {"input_size": [3, 40, 40], "crop_pct": 0.8, "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6],
                  "interpolation": "bilinear"}


def assert_recorded(clf, source: str, cfg: dict = PRETRAINED_CFG) -> None:
    size = cfg["input_size"][-1]
    assert (clf.input_size, clf.resize, clf.interpolation) == (size, math.floor(size / cfg["crop_pct"]),
                                                               cfg["interpolation"])
    torch.testing.assert_close(clf.mean.flatten(), torch.tensor(cfg["mean"]))
    torch.testing.assert_close(clf.std.flatten(), torch.tensor(cfg["std"]))
    assert {k: clf.sources[k] for k in ("input_size", "mean", "std", "interpolation")} == dict.fromkeys(
        ("input_size", "mean", "std", "interpolation"), source)
    assert clf.sources["resize"] == f"crop_pct {cfg['crop_pct']} of {source}"


def test_config_json_beside_the_checkpoint_and_explicit_settings_win(tmp_path, caplog):
    net = tiny_timm_resnet()
    torch.save(net.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 3,
                                                      "pretrained_cfg": PRETRAINED_CFG}))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for ckpt in (tmp_path / "pytorch_model.bin", tmp_path):  # the file, or the hub-format folder
            clf = timm_model("resnet18", num_classes=3, checkpoint=str(ckpt))
            assert_recorded(clf, str(tmp_path / "config.json"))
    assert not caplog.records, "the checkpoint's own size is not another resolution"
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), clf.net.state_dict().values()))

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        clf = timm_model("resnet18", num_classes=3, checkpoint=str(tmp_path), input_size=64, mean=(0.5, 0.5, 0.5))
    (rec,) = caplog.records  # another size than the checkpoint's
    assert "feeds 64 px images" in rec.getMessage() and "set model.input_size=40" in rec.getMessage()
    assert clf.input_size == 64 and clf.sources["input_size"] == "model.input_size"
    assert clf.resize == math.floor(64 / 0.8)  # the checkpoint's crop, of the size set
    assert clf.sources["mean"] == "model.mean" and clf.sources["std"] == str(tmp_path / "config.json")


def test_timm_train_script_checkpoint_with_its_args(tmp_path):
    net = tiny_timm_resnet()
    # as timm's train.py saves it: its argparse Namespace, with train.py's defaults where unset
    args = argparse.Namespace(model="resnet18", img_size=40, input_size=None, crop_pct=0.8, mean=[0.1, 0.2, 0.3],
                              std=[0.4, 0.5, 0.6], interpolation="", num_classes=3, lr=0.05)
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": net.state_dict(), "args": args},
               tmp_path / "checkpoint-3.pth.tar")
    clf = timm_model("resnet18", num_classes=3, checkpoint=str(tmp_path / "checkpoint-3.pth.tar"))
    source = "the checkpoint's 'args'"
    assert (clf.input_size, clf.resize) == (40, 50) and clf.sources["input_size"] == source
    assert clf.sources["mean"] == clf.sources["std"] == source
    torch.testing.assert_close(clf.std.flatten(), torch.tensor([0.4, 0.5, 0.6]))
    # train.py's interpolation='' means "the model's": timm's pretrained_cfg
    assert clf.interpolation == "bicubic" and clf.sources["interpolation"] == "timm's pretrained_cfg of resnet18"
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), clf.net.state_dict().values()))


def test_safetensors_metadata(tmp_path):
    from safetensors.torch import save_file

    net = tiny_timm_resnet()
    save_file(net.state_dict(), tmp_path / "model.safetensors",
              metadata={"pretrained_cfg": json.dumps(PRETRAINED_CFG), "format": "pt"})
    clf = timm_model("resnet18", num_classes=3, checkpoint=str(tmp_path / "model.safetensors"))
    assert_recorded(clf, "the safetensors metadata")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), clf.net.state_dict().values()))


TRIPPED: list[str] = []


def _trip() -> dict:
    TRIPPED.append("ran")
    return {}


class Payload:
    """Loading a pickle of this calls :func:`_trip`: code, not tensors."""

    def __reduce__(self):
        return (_trip, ())


@pytest.mark.parametrize("content", ["object", "garbage"])
def test_a_checkpoint_that_is_not_tensors_is_refused(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content == "object":
        torch.save({"state_dict": tiny_timm_resnet().state_dict(), "extra": Payload()}, path)
    else:
        path.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(HarnessError) as err:
        timm_model("resnet18", num_classes=3, checkpoint=str(path))
    msg = str(err.value)
    assert "cannot read checkpoint" in msg and "as tensors only" in msg and "state_dict()" in msg
    assert "weights_only" not in msg and "can still be loaded" not in msg and "\x1b" not in msg
    if content == "object":
        assert "test_own_models._trip" in msg  # what it would have run
    assert not TRIPPED


# 5. keys that do not fit


def test_wrong_prefix_gives_a_table_and_a_key_map_that_works(tmp_path):
    net = tiny_timm_resnet()
    path = tmp_path / "encoder.pth"
    torch.save({"model": {f"encoder.{k}": v for k, v in net.state_dict().items()}}, path)
    with pytest.raises(HarnessError) as err:
        timm_model("resnet18", num_classes=3, checkpoint=str(path))
    msg = str(err.value)
    assert "missing from the checkpoint" in msg and "unexpected in the checkpoint" in msg
    assert "conv1.weight" in msg and "encoder.conv1.weight" in msg
    hint = re.search(r"model\.key_map=\S+", msg).group(0)
    assert hint == "model.key_map=[['^encoder\\.','']]"
    clf = build(make_cfg(["model=timm", "model.name=resnet18", "model.num_classes=3",
                                f"model.checkpoint={path}", hint]).model)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), clf.net.state_dict().values()))


def test_shape_mismatch_and_bad_key_maps(tmp_path):
    path = tmp_path / "three.pth"
    torch.save(tiny_timm_resnet(3).state_dict(), path)
    with pytest.raises(HarnessError) as err:
        timm_model("resnet18", num_classes=5, checkpoint=str(path))
    assert "shape of fc.weight: model [5, 512], checkpoint [3, 512]" in str(err.value)
    assert "shape of fc.bias: model [5], checkpoint [3]" in str(err.value)
    with pytest.raises(HarnessError, match=r"pattern '\(conv' is not a regular expression"):
        timm_model("resnet18", num_classes=3, checkpoint=str(path), key_map=[["(conv", ""]])
    for entry in ("^conv", ["^conv", "a", "b"]):
        with pytest.raises(HarnessError, match=r"is not a \[pattern, replacement\] pair"):
            timm_model("resnet18", num_classes=3, checkpoint=str(path), key_map=[entry])
    with pytest.raises(HarnessError, match="renames both 'fc.weight' and 'fc.bias' to 'fc'"):
        timm_model("resnet18", num_classes=3, checkpoint=str(path), key_map=[[r"^fc\.(weight|bias)$", "fc"]])
    # the same through the config, as typed
    with pytest.raises(HarnessError, match="is not a regular expression"):
        build(make_cfg(["model=timm", "model.name=resnet18", "model.num_classes=3", f"model.checkpoint={path}",
                              "model.key_map=[['(conv','']]"]).model)


# 6. torchvision: any model by name, weights from torchvision's cache only


def test_torchvision_weights_from_the_cache_only(tmp_path, monkeypatch):
    import torch.hub
    import torchvision

    def no_network(url, *args, **kwargs):
        raise ConnectionError(f"no network in tests: {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "torch" / "hub" / "checkpoints" / enum.url.rsplit("/", 1)[-1]
    with pytest.raises(HarnessError) as err:
        torchvision_model("resnet18", weights="IMAGENET1K_V1")
    assert str(cached) in str(err.value) and "model.checkpoint=" in str(err.value)
    assert not cached.exists()

    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fc.bias": torch.zeros(1000), "x": Payload()}, cached)  # a cached file that would run code
    with pytest.raises(HarnessError, match=re.escape(str(cached))):
        torchvision_model("resnet18", weights="IMAGENET1K_V1")
    assert not TRIPPED

    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), cached)
    clf = torchvision_model("resnet18", weights="IMAGENET1K_V1")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), clf.net.state_dict().values()))
    assert (clf.input_size, clf.resize, clf.interpolation) == (224, 256, "bilinear")
    assert clf.sources["input_size"] == "the eval transform of resnet18.IMAGENET1K_V1"
    assert clf.net.fc.out_features == len(enum.meta["categories"])

    with pytest.raises(HarnessError, match="not a weights name") as err:
        torchvision_model("resnet18", weights="IMAGENET1K_V9")
    assert "valid: DEFAULT, IMAGENET1K_V1" in str(err.value)


def test_torchvision_names_and_constructor_arguments():
    with pytest.raises(HarnessError, match="did you mean resnet18") as err:
        torchvision_model("resnet81")
    assert "valid: " in str(err.value) and "convnext_tiny" in str(err.value)
    cfg = make_cfg(["model=torchvision", "model.name=resnet18", "model.num_classes=3",
                    "model.kwargs.zero_init_residual=true"])
    assert dict(cfg.model.kwargs) == {"zero_init_residual": True}
    clf = build(cfg.model)
    assert clf.net.fc.out_features == 3
    assert all(not b.bn2.weight.detach().any() for b in clf.net.layer1)  # what zero_init_residual does
    assert clf(torch.rand(1, 3, 64, 64)).shape == (1, 3)


# 7. the command line


def test_open_keys():
    assert open_keys(["model.kwargs.img_size=32", "+x.kwargs.a=1", "model.name=x", "model.model_kwargs.depth=2"]) == [
        "++model.kwargs.img_size=32", "+x.kwargs.a=1", "model.name=x", "++model.model_kwargs.depth=2"]


def test_cli_builds_the_own_vit_from_plain_keys(tmp_path):
    r = run_harness("model=timm", "model.name=vit_tiny_patch16_224", "model.num_classes=4", *VIT_KEYS,
                    "dataset=shapes", "dataset.n=2", "xai=saliency", "metrics=[]", "~mllm", "isolation=never",
                    "resume=false", "cache.dir=null", "language.cache_dir=null", f"paths.cache_dir={tmp_path}/cache",
                    f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a",
                    f"hydra.run.dir={tmp_path}/out", env={"OMP_NUM_THREADS": "1"}, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "model vit_tiny_patch16_224: input_size=32, resize=None (model.kwargs.img_size)" in out
