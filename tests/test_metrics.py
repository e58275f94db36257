"""SRG, the pointing game and region mass on inputs whose answer is known by hand."""

import numpy as np
import pytest
import torch
from torch import nn

from harness.evaluation.base import Metric
from harness.evaluation.pointing_game import PointingGame
from harness.evaluation.region_mass import RegionMass
from harness.evaluation.perturbation import SRG
from harness.models.classifier import Classifier
from harness.types import HarnessError, MetricOutput


class Linear(nn.Module):
    """logit_c = sum(w_c * x): removing a pixel (setting it to 0) lowers logit_c by w_c * x."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return torch.einsum("nchw,kchw->nk", x, self.w.to(x.dtype))


def linear_model(seed=0, size=8, classes=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, 3, size, size, generator=g)
    return Classifier(Linear(w), input_size=size, mean=(0, 0, 0), std=(1, 1, 1)).eval()


def contributions(model, x, targets):
    return (x * model.net.w[targets]).sum(1).detach()  # [N, H, W], the exact attribution


def test_srg_curve_values_by_hand():
    model = linear_model(size=4)
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([2])
    a = contributions(model, x, t)
    patch = a.reshape(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4).sum(1)  # 4 patches of 2x2
    srg = SRG(patch_size=2, steps=None, replacement=0.0)
    curves, frac = srg.curves(model, x, a[:, :, :], t)
    morf, lerf = curves["morf"], curves["lerf"]
    full = float(model(x).detach()[0, 2])
    desc, asc = torch.sort(patch, descending=True).values, torch.sort(patch).values
    exp_morf = [full - float(desc[:k].sum()) for k in range(5)]
    exp_lerf = [full - float(asc[:k].sum()) for k in range(5)]
    np.testing.assert_allclose(frac, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(morf[0], exp_morf, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lerf[0], exp_lerf, rtol=1e-5, atol=1e-5)
    score = srg(model, x, a.numpy(), t).scores["srg"][0]
    assert score == pytest.approx(np.trapezoid(exp_lerf, frac) - np.trapezoid(exp_morf, frac), abs=1e-4)


def test_srg_ranks_perfect_over_random_over_inverted_and_constant_is_zero():
    model = linear_model()
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.arange(16) % 3
    a = contributions(model, x, t).numpy()
    srg = SRG(patch_size=2, steps=8, replacement="model_mean")
    perfect = srg(model, x, a, t).scores["srg"]
    inverted = srg(model, x, -a, t).scores["srg"]
    rnd = srg(model, x, np.random.default_rng(0).random(a.shape), t).scores["srg"]
    const = srg(model, x, np.ones_like(a), t).scores["srg"]
    assert (perfect > 0).all()
    np.testing.assert_allclose(inverted, -perfect, rtol=1e-6)
    assert perfect.mean() > rnd.mean() + 3 * rnd.std() / 4
    np.testing.assert_array_equal(const, 0.0)


def test_srg_batch_equals_single_images_and_softmax_variant():
    model = linear_model()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 1, 2, 0, 1])
    a = contributions(model, x, t).numpy()
    srg = SRG(patch_size=4, steps=None, batch_size=7)  # odd batch size: chunks split the jobs
    batch = srg(model, x, a, t).scores["srg"]
    single = [srg(model, x[i : i + 1], a[i : i + 1], t[i : i + 1]).scores["srg"][0] for i in range(5)]
    np.testing.assert_allclose(batch, single, rtol=1e-6)
    soft = SRG(patch_size=4, output="softmax")(model, x, a, t).curves["srg_morf"]
    assert ((soft >= 0) & (soft <= 1)).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"replacement": "blur"}, "model_mean, mean"), ({"output": "prob"}, "logit, softmax")])
def test_srg_bad_config_names_valid_values(kwargs, message):
    with pytest.raises(HarnessError, match=message):
        SRG(**kwargs)


def test_srg_patch_size_must_divide_input():
    model = linear_model(size=8)
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(HarnessError, match="does not divide"):
        SRG(patch_size=3)(model, x, np.ones((1, 8, 8)), torch.tensor([0]))


def test_pointing_game_known_answers():
    masks = np.zeros((4, 6, 6), bool)
    masks[:, 1:3, 1:3] = True
    a = np.zeros((4, 6, 6))
    a[0, 2, 2] = 1  # on the object
    a[1, 5, 5] = 1  # far off
    a[2, 3, 3] = 1  # one pixel off the object's corner (diagonal)
    # a[3] constant: every pixel ties, the score is the object's share of the image
    s = PointingGame(tolerance=0)(None, None, a, None, masks).scores["pointing_game"]
    np.testing.assert_allclose(s, [1, 0, 0, 4 / 36])
    s1 = PointingGame(tolerance=1)(None, None, a[:3], None, masks[:3]).scores["pointing_game"]
    np.testing.assert_allclose(s1, [1, 0, 0])  # a disk of radius 1 does not reach the diagonal
    s2 = PointingGame(tolerance=2)(None, None, a[:3], None, masks[:3]).scores["pointing_game"]
    np.testing.assert_allclose(s2, [1, 0, 1])


def test_pointing_game_without_mask_is_nan():
    s = PointingGame()(None, None, np.ones((2, 4, 4)), None, [None, np.zeros((4, 4), bool)])
    assert np.isnan(s.scores["pointing_game"]).all()


def test_region_mass_known_answers():
    a = np.zeros((5, 6, 6))
    a[0, 0, 0] = 2.0  # all positive mass on the box
    a[1, 5, 5] = 1.0  # none on it
    a[2] = 1.0  # uniform: the box's share of the area, ratio 1 (chance)
    a[3, 0, 0], a[3, 5, 5], a[3, 1, 1] = 1.0, 3.0, -5.0  # negative relevance is left out: 1 / (1 + 3)
    a[4] = -1.0  # no positive mass: undefined
    out = RegionMass(box=[0, 0, 2, 3])(None, None, a, None)
    np.testing.assert_allclose(out.scores["region_mass"], [1, 0, 6 / 36, 0.25, np.nan])
    np.testing.assert_allclose(out.scores["region_mass_ratio"], [6, 0, 1, 1.5, np.nan])
    named = RegionMass(box=[4, 4, 6, 6], name="corner")(None, None, a[:2], None)
    assert set(named.scores) == {"corner", "corner_ratio"}
    np.testing.assert_allclose(named.scores["corner"], [0, 1])
    assert RegionMass.higher_is_better and RegionMass.family == "localisation" and not RegionMass.needs_masks


def test_region_mass_refuses_a_bad_box():
    a = np.ones((1, 6, 6))
    with pytest.raises(HarnessError, match=r"reaches outside the 6x6 input"):
        RegionMass(box=[4, 4, 7, 6])(None, None, a, None)
    RegionMass(box=[0, 0, 6, 6])(None, None, a, None)  # the whole image is inside
    for bad in ([0, 0, 0, 3], [2, 0, 1, 3], [-1, 0, 2, 2], [0, 0, 3], [0, 0, 1.5, 3], "abc"):
        with pytest.raises(HarnessError, match="box"):
            RegionMass(box=bad)


def test_aggregate_mean_sem_and_bootstrap_interval():
    from harness.evaluation.stage import aggregate as _aggregate

    v = np.random.default_rng(1).normal(2.0, 1.0, size=400)
    agg = _aggregate({"m": np.append(v, np.nan)})  # NaN images are left out
    assert agg["m"] == pytest.approx(v.mean()) and agg["m_sem"] == pytest.approx(v.std(ddof=1) / 20)
    low, high = agg["m_ci95_low"], agg["m_ci95_high"]
    assert low < v.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * agg["m_sem"], rel=0.15)  # normal theory
    const = _aggregate({"c": np.full(10, 3.0)})
    assert const["c_ci95_low"] == const["c_ci95_high"] == 3.0


def test_srg_softmax_variant_logs_beside_srg_and_clashes_are_refused():
    from harness.evaluation.stage import evaluate

    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)), input_size=8).eval()
    x, t = torch.rand(2, 3, 8, 8), torch.tensor([0, 2])
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    res = evaluate({"srg": SRG(patch_size=2), "srg_softmax": SRG(patch_size=2, output="softmax", name="srg_softmax")},
                   model, x, maps, t, None)
    assert set(res["srg_softmax"].scores) == {"srg_softmax", "srg_softmax_morf_auc", "srg_softmax_lerf_auc"}
    assert not np.allclose(res["srg"].scores["srg"], res["srg_softmax"].scores["srg_softmax"])
    with pytest.raises(HarnessError, match="both log"):
        evaluate({"a": SRG(patch_size=2), "b": SRG(patch_size=2, output="softmax")}, model, x, maps, t, None)


def test_curves_plot_one_panel_per_metric_with_curves(tmp_path):
    from PIL import Image

    from harness.render.curves import plot_curves
    from harness.types import MetricOutput

    x = np.linspace(0, 1, 5)
    rng = np.random.default_rng(0)
    srg = MetricOutput(scores={"srg": np.ones(3)}, curve_x=x,
                       curves={"srg_morf": rng.random((3, 5)), "srg_lerf": rng.random((3, 5))})
    pg = MetricOutput(scores={"pointing_game": np.ones(3)})
    assert plot_curves({"srg": srg, "pointing_game": pg}, tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size[0] < 700  # one panel: pointing_game has no curves
    assert not plot_curves({"pointing_game": pg}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_a_metric_failing_on_one_image_scores_nan_with_the_reason():
    from harness.evaluation.stage import evaluate

    class Flaky(Metric):
        def __init__(self, name: str = "flaky") -> None:
            super().__init__(name)

        def __call__(self, model, x, a, t, masks=None):
            if (x[:, 0, 0, 0] < 0).any():
                raise ValueError("negative pixel")
            return MetricOutput(scores={"flaky": x.mean((1, 2, 3)).numpy()},
                                curves={"flaky_c": np.ones((len(x), 3))}, curve_x=np.arange(3))

    x = torch.rand(4, 3, 2, 2)
    x[2, 0, 0, 0] = -1
    res = evaluate({"flaky": Flaky()}, None, x, np.zeros((4, 2, 2)), torch.zeros(4, dtype=torch.long), None)["flaky"]
    np.testing.assert_allclose(res.scores["flaky"][[0, 1, 3]], x[[0, 1, 3]].mean((1, 2, 3)).numpy(), rtol=1e-6)
    assert np.isnan(res.scores["flaky"][2]) and np.isnan(res.curves["flaky_c"][2]).all()
    assert res.errors == [(2, "ValueError: negative pixel")]
