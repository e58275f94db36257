"""Every explainer option: the output contract on a ViT and a CNN, determinism, batch
invariance, known answers, and no hooks left behind."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from conftest import make_cfg
from harness import CONF_DIR
from harness.data.shapes import make_shapes
from harness.models.cifar_resnet import CifarResNet
from harness.models.classifier import Classifier
from harness.xai.gradcam import GradCAM
from harness.xai.occlusion import Occlusion

XAI = sorted(p.stem for p in (CONF_DIR / "xai").glob("*.yaml")
             if "_target_" in OmegaConf.load(p))  # not the aliases (shap is partition_shap)
FAST = {"smoothgrad": ["xai.n_samples=4"], "freemcg": ["xai.n_particles=16"], "lime": ["xai.num_samples=64"], "kernelshap": ["xai.n_samples=64"]}


def tiny_vit():
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32,
                            patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return Classifier(net, input_size=32).eval()


def tiny_cnn():
    torch.manual_seed(0)
    return Classifier(CifarResNet(depth=8, num_classes=4), input_size=32).eval()


MODELS = {"vit": tiny_vit, "cnn": tiny_cnn}


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("option", XAI)
def test_contract_determinism_batch_invariance_no_leftovers(option, arch):
    model = MODELS[arch]()
    ex = instantiate(make_cfg([f"xai={option}", *FAST.get(option, [])]).xai)
    if arch not in ex.architectures:
        pytest.skip(f"{option} serves {', '.join(ex.architectures)} models only")
    # Real images: superpixel methods see structure (random noise is one SLIC segment).
    x = torch.from_numpy(np.stack(make_shapes(n=3, seed=5).images)).permute(0, 3, 1, 2).float() / 255
    t = torch.tensor([0, 3, 1])
    before = hooks(model)
    a = ex(model, x, t)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.abs(a).sum() > 0
    np.testing.assert_allclose(ex(model, x, t), a, rtol=1e-5, atol=1e-6)  # same seed, same map
    np.testing.assert_allclose(ex(model, x[1:2], t[1:2])[0], a[1], rtol=1e-4, atol=1e-5)
    assert hooks(model) == before


def test_gradcam_known_answer():
    """Conv 1x1 picking the red and green channels, global average pool, identity head: for
    class 0 the gradient weights are (1/HW, 0), so Grad-CAM is exactly the red channel."""
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1
        conv.weight[1, 1] = 1
    net = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = Classifier(net, input_size=8, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0, :3, :3] = 1  # red square top left
    x[0, 1, 4:, 4:] = 0.5  # green bottom right
    cam = GradCAM(layer="0")(model, x, [0])[0]
    np.testing.assert_allclose(cam / cam.max(), x[0, 0].numpy(), atol=1e-6)
    assert GradCAM()(model, x, [1])[0][6, 6] > 0 and GradCAM()(model, x, [1])[0][1, 1] == 0


def test_gradcam_on_vit_reads_the_token_grid():
    model = tiny_vit()
    a = GradCAM()(model, torch.rand(2, 3, 32, 32), [0, 1])
    assert a.shape == (2, 32, 32) and (a >= 0).all()


def test_occlusion_on_a_linear_model_is_exact():
    torch.manual_seed(0)
    w = torch.randn(3, 3, 8, 8)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 3, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(w.reshape(3, -1))
    model = Classifier(net, input_size=8, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    x = torch.rand(2, 3, 8, 8)
    a = Occlusion(patch=4, stride=4, baseline="model_mean")(model, x, [2, 0])
    contrib = (x * w[[2, 0]]).sum(1)  # logit = sum(w x); removing a patch drops its share
    expected = contrib.reshape(2, 2, 4, 2, 4).sum((2, 4)).repeat_interleave(4, 1).repeat_interleave(4, 2)
    np.testing.assert_allclose(a, expected.numpy(), rtol=1e-5, atol=1e-5)
