"""Quantus complexity and localisation metrics on maps whose scores are known by hand."""

import inspect
import logging

import numpy as np
import pytest
from scipy import stats

from harness.evaluation.quantus_metrics import (
    Complexity,
    LocalisationAUC,
    RelevanceMassAccuracy,
    RelevanceRankAccuracy,
    Sparseness,
    _degenerate_maps_allowed,
)

ALL = [Sparseness, Complexity, RelevanceMassAccuracy, RelevanceRankAccuracy, LocalisationAUC]
LOCALISATION = [RelevanceMassAccuracy, RelevanceRankAccuracy, LocalisationAUC]
H = W = 8


def score(metric, a, masks=None, x=None):
    a = np.asarray(a, dtype=np.float64)
    a = a[None] if a.ndim == 2 else a
    if masks is not None:
        masks = np.asarray(masks)
        masks = masks[None] if masks.ndim == 2 else masks
    return metric(None, x, a, None, masks).scores[metric.name]


def block_mask():
    m = np.zeros((H, W), bool)
    m[2:5, 3:7] = True  # 12 of 64 pixels
    return m


def one_hot(i=2, j=5):
    a = np.zeros((H, W))
    a[i, j] = 1.0
    return a


def rand_map(seed, signed=False):
    r = np.random.default_rng(seed).random((H, W))
    return 2 * r - 1 if signed else r


# --- complexity family -------------------------------------------------------------------------

def test_sparseness_known_answers():
    n = H * W
    s = Sparseness()
    # Gini of one non-zero pixel is (n-1)/n; Quantus adds 1e-7 to every value: (n-1)/(n(1+n*1e-7)).
    assert score(s, one_hot())[0] == pytest.approx((n - 1) / (n * (1 + n * 1e-7)), rel=1e-9)
    assert score(s, np.full((H, W), 0.3))[0] == pytest.approx(0.0, abs=1e-12)
    # Independent Gini index: mean absolute difference over all pairs / (2 * mean).
    for seed in range(3):
        a = rand_map(seed, signed=True)
        v = np.abs(a).ravel() / np.abs(a).max() + 1e-7
        gini = np.abs(v[:, None] - v[None, :]).sum() / (2 * len(v) ** 2 * v.mean())
        assert score(s, a)[0] == pytest.approx(gini, rel=1e-9)
        assert score(s, -a)[0] == pytest.approx(gini, rel=1e-9)  # abs=True: the sign does not matter


def test_complexity_known_answers():
    c = Complexity()
    assert score(c, one_hot())[0] == pytest.approx(0.0, abs=1e-9)
    assert score(c, np.full((H, W), 0.3))[0] == pytest.approx(np.log(H * W), rel=1e-9)
    for seed in range(3):
        a = rand_map(seed, signed=True)
        assert score(c, a)[0] == pytest.approx(stats.entropy(np.abs(a).ravel()), rel=1e-9)
    assert score(c, one_hot())[0] < score(c, rand_map(0))[0] < np.log(H * W)
    assert np.isnan(score(c, np.zeros((H, W)))[0])  # 0/0: no distribution to measure
    assert np.isnan(score(Complexity(abs=False), rand_map(0, signed=True))[0])  # log of a negative share


def test_scores_do_not_depend_on_batch_neighbours_or_scale():
    a = np.stack([rand_map(1), 1e-6 * rand_map(2), 1e3 * rand_map(3, signed=True)])
    for cls in (Sparseness, Complexity):
        batch = score(cls(), a)
        single = [score(cls(), a[i])[0] for i in range(3)]
        np.testing.assert_allclose(batch, single, rtol=1e-12)
        np.testing.assert_allclose(score(cls(), a[1] * 1e6)[0], batch[1], rtol=1e-9)


# --- localisation family -----------------------------------------------------------------------

def test_relevance_mass_accuracy_known_answers():
    m = block_mask()
    r = RelevanceMassAccuracy()
    assert score(r, m, m)[0] == pytest.approx(1.0)
    assert score(r, ~m, m)[0] == pytest.approx(0.0)
    assert score(r, np.full((H, W), 0.5), m)[0] == pytest.approx(m.mean())
    a = rand_map(4)
    assert score(r, a, m)[0] == pytest.approx((a * m).sum() / a.sum(), rel=1e-12)
    # Signed map: abs=False (Quantus' default) keeps the signs, abs=True scores magnitudes.
    s = rand_map(5, signed=True)
    assert score(r, s, m)[0] == pytest.approx((s * m).sum() / s.sum(), rel=1e-9)
    assert score(RelevanceMassAccuracy(abs=True), s, m)[0] == pytest.approx(
        (np.abs(s) * m).sum() / np.abs(s).sum(), rel=1e-9)


def test_relevance_rank_accuracy_known_answers():
    m = block_mask()
    r = RelevanceRankAccuracy()
    assert score(r, m, m)[0] == pytest.approx(1.0)
    assert score(r, ~m, m)[0] == pytest.approx(0.0)
    a = rand_map(6)  # continuous values: no ties
    k = int(m.sum())
    top = np.argsort(-a.ravel())[:k]
    assert score(r, a, m)[0] == pytest.approx(m.ravel()[top].mean())
    # Half of the object on top, the rest below every background pixel: exactly 1/2.
    half = np.where(m, -1.0, 0.0)
    half[2, 3:7] = 1.0
    half[3, 3:5] = 1.0
    assert score(r, half, m)[0] == pytest.approx(0.5)


def test_localisation_auc_known_answers():
    m = block_mask()
    auc = LocalisationAUC()
    assert score(auc, m, m)[0] == pytest.approx(1.0)
    assert score(auc, ~m, m)[0] == pytest.approx(0.0)
    assert score(auc, np.full((H, W), 0.5), m)[0] == pytest.approx(0.5)
    assert np.isnan(score(auc, rand_map(7), np.ones((H, W), bool))[0])  # no background: undefined
    # Independent AUC: the Mann-Whitney U statistic from average ranks (ties count half).
    a = np.round(rand_map(7, signed=True), 1)  # rounded: many ties
    ranks = stats.rankdata(a.ravel())
    n1, n0 = int(m.sum()), int((~m).sum())
    expected = (ranks[m.ravel()].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    assert score(auc, a, m)[0] == pytest.approx(expected, rel=1e-12)
    assert score(LocalisationAUC(abs=True), a, m)[0] == pytest.approx(
        score(auc, np.abs(a), m)[0], rel=1e-12)


@pytest.mark.parametrize("cls", LOCALISATION)
def test_missing_or_empty_mask_is_nan_and_others_still_score(cls):
    m = block_mask()
    a = np.stack([m, m, m]).astype(float)
    masks = [m, np.zeros((H, W), bool), None]
    s = cls()(None, None, a, None, masks).scores[cls().name]
    assert s[0] == pytest.approx(1.0)
    assert np.isnan(s[1:]).all()
    assert np.isnan(cls()(None, None, a, None, None).scores[cls().name]).all()


def test_a_quantus_exception_on_one_image_gives_nan_for_that_image(caplog):
    from harness.evaluation.stage import evaluate

    m = block_mask()
    a = np.stack([m.astype(float), rand_map(8), m.astype(float)])
    a[1, 0, 0] = np.nan  # scikit-learn's roc_curve raises "Input contains NaN"
    x = np.random.default_rng(0).random((3, 3, H, W)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        res = evaluate({"auc": LocalisationAUC()}, None, x, a, np.zeros(3, np.int64), np.stack([m] * 3))["auc"]
    s = res.scores["localisation_auc"]
    np.testing.assert_allclose(s[[0, 2]], 1.0)
    assert np.isnan(s[1])
    assert [i for i, _ in res.errors] == [1] and "NaN" in res.errors[0][1]  # the reason is kept
    assert "failed on 1 of 3 images" in caplog.text


def test_degenerate_maps_scored_unless_quantus_checks_are_kept():
    from quantus.helpers import asserts

    m = block_mask()
    a = np.stack([m.astype(float), np.full((H, W), 0.5)])
    masks = np.stack([m, m])
    np.testing.assert_allclose(score(RelevanceMassAccuracy(), a, masks), [1.0, m.mean()])
    strict = score(RelevanceMassAccuracy(check_attributions=True), a, masks)
    assert strict[0] == pytest.approx(1.0) and np.isnan(strict[1])  # Quantus refuses a constant map
    original = asserts.assert_attributions
    with pytest.raises(RuntimeError), _degenerate_maps_allowed():
        assert asserts.assert_attributions is not original
        raise RuntimeError
    assert asserts.assert_attributions is original  # the patch is gone, errors included


def test_directions_and_defaults_match_quantus():
    import quantus
    from quantus.helpers.enums import ScoreDirection

    for cls in ALL:
        q = getattr(quantus, cls.quantus_class)
        assert cls.higher_is_better == (q.score_direction == ScoreDirection.HIGHER), cls
        quantus_defaults = inspect.signature(q).parameters
        m = cls().quantus_metric()
        assert (m.abs, m.normalise) == (quantus_defaults["abs"].default, quantus_defaults["normalise"].default), cls
    assert {c.family for c in ALL} == {"complexity", "localisation"}
    assert all(c.needs_masks for c in LOCALISATION) and not Sparseness.needs_masks


def test_options_compose_with_hydra_and_run_in_evaluate():
    import torch
    from conftest import make_cfg

    from harness.evaluation.perturbation import SRG
    from harness.components import build
    from harness.evaluation.stage import evaluate

    cfg = make_cfg(["metrics=[srg,sparseness]"])
    metrics = {name: build(node) for name, node in cfg.metrics.items()}
    assert isinstance(metrics["srg"], SRG) and isinstance(metrics["sparseness"], Sparseness)
    names = ["sparseness", "complexity", "relevance_mass_accuracy", "relevance_rank_accuracy",
             "localisation_auc"]
    cfg = make_cfg([f"metrics=[{','.join(names)}]"])
    metrics = {name: build(node) for name, node in cfg.metrics.items()}
    assert [type(metrics[n]) for n in names] == ALL
    assert metrics["relevance_mass_accuracy"].abs is False and metrics["complexity"].abs is True
    x = torch.rand(2, 3, H, W)
    maps = np.stack([one_hot(), np.full((H, W), 0.5)]).astype(np.float32)
    out = evaluate(metrics, None, x, maps, torch.tensor([0, 1]), None)  # no masks: localisation skipped
    assert set(out) == {"sparseness", "complexity"}
    np.testing.assert_allclose(out["complexity"].scores["complexity"], [0.0, np.log(H * W)], atol=1e-6)
    masks = np.stack([block_mask()] * 2)
    out = evaluate(metrics, None, x, maps, torch.tensor([0, 1]), masks)
    # One object pixel of 12 outranks the background, 11 tie with it: 1/12 + (11/12) / 2.
    np.testing.assert_allclose(out["localisation_auc"].scores["localisation_auc"],
                               [1 / 12 + 11 / 24, 0.5], rtol=1e-12)
