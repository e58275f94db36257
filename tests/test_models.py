import math
import numpy as np
import pytest
import torch

from conftest import SHARED, needs_shared, run_harness
from harness.models.builders import cifar_resnet, load_weights, timm_model, torchvision_model
from harness.models.cifar_resnet import CifarResNet
from harness.models.classifier import Classifier
from harness.types import HarnessError


def test_cifar_resnet20_architecture():
    net = CifarResNet(depth=20)
    assert sum(p.numel() for p in net.parameters()) == 269_722  # He et al. report 0.27M
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n"):
        CifarResNet(depth=21)


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    net = CifarResNet(depth=20)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "w.th")
    other = CifarResNet(depth=20)
    load_weights(other, tmp_path / "w.th")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    with pytest.raises(HarnessError, match="does not fit"):
        load_weights(CifarResNet(depth=32), tmp_path / "w.th")
    with pytest.raises(HarnessError, match="not found"):
        load_weights(net, tmp_path / "missing.pth")


def test_preprocess_resizes_crops_and_keeps_masks_aligned():
    clf = Classifier(torch.nn.Identity(), input_size=8, resize=10)
    img = np.zeros((20, 40, 3), np.uint8)
    mask = np.zeros((20, 40), bool)
    img[8:12, 18:22] = 255
    mask[8:12, 18:22] = True
    x, m = clf.preprocess([img], [mask])
    assert x.shape == (1, 3, 8, 8) and m.shape == (1, 8, 8)
    assert m[0].any() and (x[0, 0][torch.from_numpy(m[0])] > 0.5).all()  # the mask follows the pixels


def test_timm_model_by_name_random_weights():
    clf = timm_model("resnet18", num_classes=5)
    crop_pct = clf.net.pretrained_cfg["crop_pct"]  # preprocessing comes from timm's pretrained_cfg
    assert clf.input_size == 224 and clf.resize == math.floor(224 / crop_pct)  # as timm's eval transform
    assert clf(torch.rand(1, 3, 224, 224)).shape == (1, 5)
    with pytest.raises(HarnessError, match="no model"):
        timm_model("resnet_does_not_exist")


def test_pretrained_offline_gives_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HarnessError, match="model.checkpoint="):
        timm_model("resnet18", pretrained=True, cache_dir="/nonexistent/hub-cache")


def test_offline_message_in_the_cli_instead_of_a_traceback(tmp_path):
    r = run_harness("model=timm", "model.name=resnet18", "model.pretrained=true", "xai=random",
                    "dataset.n=2", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                    f"tracking.artifact_location={tmp_path}/a", f"hydra.run.dir={tmp_path}/out",
                    env={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 1
    assert "model.checkpoint=" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    from mlflow import MlflowClient

    runs = MlflowClient(f"sqlite:///{tmp_path}/m.db").search_runs(["1"])
    assert [x.info.status for x in runs] == ["FAILED"]  # the failure is recorded, not lost
    assert "model.checkpoint=" in runs[0].data.tags["error"]


@pytest.mark.real_data
@needs_shared
def test_cifar10_resnet20_accuracy_on_shared_images():
    from harness.data.files import npz_images

    data = npz_images(str(SHARED / "cifar10/test_first1017.npz"), str(SHARED / "cifar10/classes.txt"))
    clf = cifar_resnet(checkpoint=str(SHARED / "cifar10/resnet20-12fca82f.th"))
    x, _ = clf.preprocess(data.images)
    acc = float((clf.predict(x).argmax(1).numpy() == data.labels).mean())
    assert len(data) == 1017 and data.class_names[3] == "cat"
    assert acc == pytest.approx(0.9164, abs=0.001)  # 932 / 1017, as measured by the data's README


@pytest.mark.real_data
@needs_shared
def test_imagenet_mobilenet_v2_on_shared_samples():
    from harness.data.files import image_folder

    data = image_folder(str(SHARED / "imagenet/samples"), str(SHARED / "imagenet/classes.tsv"),
                        classes_column="names", label_regex=r"_(\d+)\.\w+$")
    clf = torchvision_model("mobilenet_v2", fused=True,
                            checkpoint=str(SHARED / "imagenet/mobilenet_v2_fused_float32.pth"))
    x, _ = clf.preprocess(data.images)
    correct = int((clf.predict(x).argmax(1).numpy() == data.labels).sum())
    assert len(data) == 20 and len(data.class_names) == 1000
    assert correct == 19
