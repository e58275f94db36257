"""Attention rollout and Chefer relevance on tiny random timm ViTs: contract, known answer,
class dependence, no leftovers, and a clear error on CNNs."""

import numpy as np
import pytest
import torch
from torch import nn

from harness.models.classifier import Classifier
from harness.types import HarnessError
from harness.xai.attention import AttentionRollout, CheferRelevance, _attention_modules, attention_probs

METHODS = {
    "rollout": AttentionRollout,
    "rollout_max_discard": lambda: AttentionRollout(head_fusion="max", discard_ratio=0.5),
    "rollout_min_start1": lambda: AttentionRollout(head_fusion="min", start_layer=1),
    "chefer": CheferRelevance,
}


def tiny_vit(embed_dim=32):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32,
                            patch_size=8, embed_dim=embed_dim, depth=2, num_heads=2)
    return Classifier(net, input_size=32).eval()


def tiny_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    return Classifier(net, input_size=32).eval()


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def images(n=3, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", METHODS)
def test_contract_and_batch_invariance(method):
    model, ex = tiny_vit(), METHODS[method]()
    x, t = images(), torch.tensor([0, 3, 1])
    a = ex(model, x, t)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.abs(a).sum() > 0
    np.testing.assert_array_equal(ex(model, x, t), a)  # no randomness
    for i in range(3):
        np.testing.assert_allclose(ex(model, x[i : i + 1], t[i : i + 1])[0], a[i], rtol=1e-4, atol=1e-6)


def test_unfused_path_reads_probabilities_and_keeps_logits():
    model = tiny_vit()
    x = images()
    with torch.no_grad():
        ref = model(x)
        mods = _attention_modules(model, "test")
        with attention_probs(mods) as store:
            out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(store) == 2
    for p in store.values():
        assert p.shape == (3, 2, 17, 17) and (p >= 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(3, 2, 17))


class OneHotQK(nn.Module):
    """A qkv projection whose queries and keys are one-hot token positions (queries scaled up),
    so every head's softmax attention is the identity; values are the input."""

    def __init__(self, num_heads, head_dim):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim

    def forward(self, x):
        n, t, d = x.shape
        onehot = torch.eye(t, self.head_dim, dtype=x.dtype).expand(n, self.num_heads, t, -1)
        qk = onehot.transpose(1, 2).reshape(n, t, -1)
        return torch.cat([1000 * qk, qk, x], dim=-1)


def test_rollout_of_identity_attention_is_uniform():
    model = tiny_vit(embed_dim=64)  # head_dim 32 >= 17 tokens, room for one-hot positions
    for blk in model.net.blocks:
        blk.attn.qkv = OneHotQK(blk.attn.num_heads, blk.attn.head_dim)
    x = images()
    with torch.no_grad(), attention_probs(_attention_modules(model, "test")) as store:
        model(x)
    for p in store.values():  # the construction really gives identity attention
        torch.testing.assert_close(p, torch.eye(17).expand_as(p), rtol=0, atol=1e-6)
    for ex in (AttentionRollout(), AttentionRollout(head_fusion="max", discard_ratio=0.9)):
        a = ex(model, x, [0, 1, 2])
        assert np.ptp(a) < 1e-6


@pytest.mark.parametrize("method", ["rollout", "chefer"])
def test_flags_and_hooks_restored_also_on_error(method, monkeypatch):
    model, ex = tiny_vit(), METHODS[method]()
    attns = [blk.attn for blk in model.net.blocks]
    attns[1].fused_attn = False  # a mixed starting state must come back exactly
    flags = [a.fused_attn for a in attns]
    before = hooks(model)
    ex(model, images(2), [0, 1])
    assert [a.fused_attn for a in attns] == flags and hooks(model) == before

    with pytest.raises(Exception):  # wrong input size: fails in the patch embedding
        ex(model, torch.rand(1, 3, 40, 40), [0])
    assert [a.fused_attn for a in attns] == flags and hooks(model) == before

    def boom(*_a, **_k):
        raise RuntimeError("mid-forward failure")

    monkeypatch.setattr(model.net.blocks[1].mlp, "forward", boom)  # after block 0 was read
    with pytest.raises(RuntimeError, match="mid-forward"):
        ex(model, images(1), [0])
    assert [a.fused_attn for a in attns] == flags and hooks(model) == before


def test_chefer_depends_on_the_class_rollout_does_not():
    model, x = tiny_vit(), images(2)
    c0, c1 = CheferRelevance()(model, x, [0, 0]), CheferRelevance()(model, x, [1, 1])
    assert np.abs(c0 - c1).max() > 1e-3 * np.abs(c0).max()
    r0, r1 = AttentionRollout()(model, x, [0, 0]), AttentionRollout()(model, x, [1, 1])
    np.testing.assert_array_equal(r0, r1)


@pytest.mark.parametrize("method", ["rollout", "chefer"])
def test_cnn_raises_a_clear_error(method):
    model = tiny_cnn()
    with pytest.raises(HarnessError, match="gradcam"):
        METHODS[method]()(model, images(1), [0])


def test_bad_arguments():
    with pytest.raises(HarnessError):
        AttentionRollout(head_fusion="median")
    with pytest.raises(HarnessError):
        AttentionRollout(discard_ratio=1.0)
    with pytest.raises(HarnessError):
        CheferRelevance(start_layer=2)(tiny_vit(), images(1), [0])
