"""CRP against the reference implementation, zennit-crp (Achtibat et al.'s ``crp`` package).

On a plain CNN with no BatchNorm (nothing for our folding or zennit's canonizers to do
differently) and the same composite on both sides, our :class:`~harness.xai.crp.CRP` and
zennit-crp's ``CondAttribution`` give the same unconditional map, the same relevance at the layer
(per channel and position) and the same concept-conditional maps. Both seed the backward pass
with the target logit and sum the relevance of the normalised input ``z = (x - mean) / std`` over
colour channels, so zennit-crp is given ``z`` and the bare network.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from harness.models.classifier import Classifier
from harness.xai.crp import CRP
from harness.xai.lrp import LRP

crp_attribution = pytest.importorskip(
    "crp.attribution", reason="zennit-crp is not installed (it is in the dev group: uv sync --group dev)")


def plain_cnn(pool: type[nn.Module], seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), pool(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    with torch.no_grad():  # logits of order one rather than 1e-5, so the comparison means something
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(3)
    return Classifier(net, input_size=32).eval()


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("pool", [nn.MaxPool2d, nn.AvgPool2d])
@pytest.mark.parametrize("layer", ["2", "3", "5"])  # conv outputs and a ReLU output
def test_crp_matches_zennit_crp(pool, layer):
    from zennit.composites import EpsilonPlusFlat

    model = plain_cnn(pool)
    torch.manual_seed(1)
    x, t = torch.rand(3, 3, 32, 32), torch.tensor([0, 3, 1])
    lrp = LRP(composite="epsilon_plus_flat")
    ours = CRP(layer=layer, cnn=lrp)
    full, rel, act = ours.layer_relevance(model, x, t)
    channels = torch.tensor([[0, 5, 7], [1, 2, rel.shape[1] - 1], [3, 4, 6]])
    cond = ours.conditional(model, x, t, channels)

    # The reference: the same composite as harness.xai.lrp._composite builds for epsilon_plus_flat.
    def composite():
        return EpsilonPlusFlat(epsilon=lrp.epsilon, stabilizer=lrp.stabilizer)

    attr = crp_attribution.CondAttribution(copy.deepcopy(model.net))  # it sets requires_grad off
    z = ((x - model.mean) / model.std).detach()
    ref = attr(z.clone().requires_grad_(True), [{"y": [int(ti)]} for ti in t], composite(), record_layer=[layer])
    close(full, ref.heatmap)  # (a) unconditional map
    close(act, ref.activations[layer])
    close(rel, ref.relevances[layer])  # (c) layer relevance, per channel and position
    close(rel.flatten(2).sum(2), ref.relevances[layer].flatten(2).sum(2))

    conditions = [{"y": [int(t[i])], layer: [int(c)]} for i in range(len(t)) for c in channels[i]]
    zk = z.repeat_interleave(channels.shape[1], 0)
    ref_cond = attr(zk.clone().requires_grad_(True), conditions, composite(), record_layer=[layer])
    close(cond, ref_cond.heatmap.reshape(cond.shape))  # (b) concept-conditional maps

    # The conditional pass's relevance at the layer: the condition's channel keeps its relevance,
    # the others none. (zennit-crp's default exclude_parallel=True reports twice the value here on
    # recent torch, where autograd.grad also fills the .grad of a retain_grad tensor; the maps are
    # unaffected. exclude_parallel=False takes one plain backward pass.)
    ref_one = attr(zk.clone().requires_grad_(True), conditions, composite(), record_layer=[layer],
                   exclude_parallel=False)
    close(cond, ref_one.heatmap.reshape(cond.shape))
    kept = torch.zeros(len(conditions), rel.shape[1]).scatter_(1, channels.reshape(-1, 1), 1.0)
    masked = rel.repeat_interleave(channels.shape[1], 0) * kept[:, :, None, None]
    close(masked, ref_one.relevances[layer])
