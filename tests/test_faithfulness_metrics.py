"""Pixel flipping, region perturbation, faithfulness correlation and ROAD: known answers, and
equality with Quantus 0.6.0 at equal settings."""

import contextlib
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from harness.evaluation.faithfulness_correlation import FaithfulnessCorrelation
from harness.evaluation.perturbation import SRG, PixelFlipping, RegionPerturbation
from harness.evaluation.road import ROAD
from harness.models.classifier import Classifier
from harness.types import HarnessError
from harness.xai.base import image_seed
from test_metrics import contributions, linear_model


def conv_model(seed=0, channels=3, size=8, classes=4, wrap=True):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.Tanh(),
                        nn.Flatten(), nn.Linear(6 * size * size, classes))
    return (Classifier(net, input_size=size, mean=(0, 0, 0), std=(1, 1, 1)) if wrap else net).eval()


def data(n=4, channels=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g)  # float32: Quantus feeds the model torch.Tensor(x)
    a = torch.randn(n, size, size, generator=g).numpy()  # continuous: no ties
    return x, a, torch.arange(n) % 4


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def quantus_call(metric, model, x, a, t, channels=1, **kw):
    with quiet():
        return metric(model=model, x_batch=x.numpy(), y_batch=t.numpy(), a_batch=a[:, None].repeat(channels, 1),
                      channel_first=True, device="cpu", batch_size=len(x), **kw)


# --- pixel flipping ------------------------------------------------------------------------------

def test_pixel_flipping_curve_by_hand_and_ranking():
    model = linear_model(size=4)
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1])
    a = contributions(model, x, t)
    pf = PixelFlipping(steps=None, replacement=0.0, output="logit")
    res = pf(model, x, a.numpy(), t)
    full = float(model(x).detach()[0, 1])
    expected = [full - float(torch.sort(a.flatten(), descending=True).values[:k].sum()) for k in range(17)]
    np.testing.assert_allclose(res.curves["pixel_flipping_morf"][0], expected, rtol=1e-5, atol=1e-5)
    assert res.scores["pixel_flipping"][0] == pytest.approx(np.trapezoid(expected, np.arange(17) / 16), abs=1e-4)
    assert res.scores["pixel_flipping"][0] < pf(model, x, -a.numpy(), t).scores["pixel_flipping"][0]


def test_pixel_flipping_equals_quantus():
    import quantus

    model = conv_model(size=6)  # Quantus asserts features_in_step divides H*W: 3 divides 36
    x, a, t = data(size=6)
    ours = PixelFlipping(steps=None, replacement=0.0, output="softmax")(model, x, a, t).curves["pixel_flipping_morf"]
    # Quantus wants features_in_step to divide the map's size: give it the map on every channel,
    # then a step of 3 features is one pixel (its 3 tied channel values are adjacent in the order).
    theirs = quantus_call(quantus.PixelFlipping(features_in_step=3, perturb_baseline=0.0, disable_warnings=True),
                          model, x, a, t, channels=3, softmax=True)
    np.testing.assert_allclose(ours[:, 1:], np.asarray(theirs), rtol=1e-5, atol=1e-6)


# --- region perturbation and SRG -----------------------------------------------------------------

def test_region_perturbation_and_srg_equal_quantus():
    import quantus

    model = conv_model()
    x, a, t = data()
    rp = RegionPerturbation(patch_size=2, regions=16, replacement=0.0, output="logit")(model, x, a, t)
    full = model(x).detach().gather(1, t[:, None])[:, 0].numpy()
    for order in ("morf", "lerf"):
        theirs = np.asarray(quantus_call(quantus.RegionPerturbation(
            patch_size=2, order=order, regions_evaluation=16, perturb_baseline=0.0, disable_warnings=True),
            model, x, a, t, softmax=False))
        ours = rp.curves[f"region_perturbation_{order}"]
        np.testing.assert_allclose(full[:, None] - ours[:, 1:], theirs, rtol=1e-5, atol=1e-6)
        # AOPC (Samek et al.): mean over k = 0..L of f(x) - f(x_k), the k = 0 term being 0
        np.testing.assert_allclose(rp.scores[f"region_perturbation_{order}_aopc"], theirs.sum(1) / 17, rtol=1e-5, atol=1e-8)
    # SRG over all 16 patches = area between Quantus' LeRF and MoRF curves
    srg = SRG(patch_size=2, steps=None, replacement=0.0)(model, x, a, t).scores["srg"]
    curve = {o: np.asarray(quantus_call(quantus.RegionPerturbation(
        patch_size=2, order=o, regions_evaluation=16, perturb_baseline=0.0, disable_warnings=True),
        model, x, a, t, softmax=False)) for o in ("morf", "lerf")}
    frac = np.arange(17) / 16
    auc = {o: np.trapezoid(np.hstack([full[:, None], full[:, None] - c]), frac, axis=1) for o, c in curve.items()}
    np.testing.assert_allclose(srg, auc["lerf"] - auc["morf"], rtol=1e-5, atol=1e-8)


def test_region_perturbation_known_direction_and_bad_options():
    model = linear_model()
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.arange(8) % 3
    a = contributions(model, x, t).numpy()
    rp = RegionPerturbation(patch_size=2, regions=8, output="logit")
    good, bad = rp(model, x, a, t).scores, rp(model, x, -a, t).scores
    assert (good["region_perturbation_morf_aopc"] > bad["region_perturbation_morf_aopc"]).all()
    assert (good["region_perturbation_lerf_aopc"] < bad["region_perturbation_lerf_aopc"]).all()
    with pytest.raises(HarnessError, match="valid: a list of distinct values"):
        RegionPerturbation(orders=["morf", "up"])
    with pytest.raises(HarnessError, match="does not divide"):
        RegionPerturbation(patch_size=3)(model, x, a, t)


# --- faithfulness correlation ---------------------------------------------------------------------

def test_faithfulness_correlation_known_answers():
    # Same weights and values in every channel: a subset's summed relevance is exactly 3x the logit drop.
    w = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)).repeat(1, 3, 1, 1)
    model = linear_model()
    model.net.w.data = w
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(5)).repeat(1, 3, 1, 1)
    t = torch.tensor([0, 1, 0])
    a = contributions(model, x, t).numpy()
    fc = FaithfulnessCorrelation(nr_runs=20, subset_size=30, replacement=0.0, output="logit")
    np.testing.assert_allclose(fc(model, x, a, t).scores["faithfulness_correlation"], 1.0, atol=1e-6)
    np.testing.assert_allclose(fc(model, x, -a, t).scores["faithfulness_correlation"], -1.0, atol=1e-6)
    assert np.isnan(fc(model, x, np.ones_like(a), t).scores["faithfulness_correlation"]).all()  # constant map
    single = [fc(model, x[i : i + 1], a[i : i + 1], t[i : i + 1]).scores["faithfulness_correlation"][0] for i in range(3)]
    np.testing.assert_allclose(fc(model, x, a, t).scores["faithfulness_correlation"], single)  # batch-independent


def test_faithfulness_correlation_equals_quantus():
    import quantus

    model = conv_model()
    x, a, t = data(n=3)
    fc = FaithfulnessCorrelation(nr_runs=15, subset_size=20, replacement=0.0, output="softmax", seed=3)
    ours = fc(model, x, a, t).scores["faithfulness_correlation"]
    for i in range(3):  # Quantus draws from the global RNG, image after image: one call per image
        np.random.seed(image_seed(3, x[i]))
        theirs = quantus_call(quantus.FaithfulnessCorrelation(nr_runs=15, subset_size=20, perturb_baseline=0.0,
                                                              return_aggregate=False, disable_warnings=True),
                              model, x[i : i + 1], a[i : i + 1], t[i : i + 1], softmax=True)
        assert ours[i] == pytest.approx(theirs[0], abs=1e-5)  # float32 softmax in Quantus


# --- ROAD ----------------------------------------------------------------------------------------

def test_road_equals_quantus_on_one_channel_images():
    import quantus

    model = conv_model(channels=1, wrap=False)
    x, a, _ = data(n=6, channels=1)
    t = model(x).argmax(1).detach()  # the predicted class: curves start at 1
    pct = [5, 25, 50, 75, 95]
    ours = ROAD(percentages=pct, noise=0.0)(model, x, a, t)
    theirs = quantus_call(quantus.ROAD(percentages=pct, noise=0.0, disable_warnings=True), model, x, a, t,
                          softmax=False)
    np.testing.assert_allclose(ours.curves["road_morf"].mean(0), [theirs[p] for p in pct])
    assert set(np.unique(ours.curves["road_morf"])) <= {0.0, 1.0}


def test_road_imputation_and_orders():
    road = ROAD(percentages=[50], noise=0.0, orders=["morf", "lerf"])
    flat = np.full((3, 6, 6), 0.3)
    np.testing.assert_allclose(road.impute(flat, np.arange(0, 36, 2), seed=0), 0.3)  # a constant image stays
    img = np.random.default_rng(0).random((3, 6, 6))
    out = road.impute(img, np.array([7, 14]), seed=0)
    keep = np.ones(36, bool)
    keep[[7, 14]] = False
    np.testing.assert_array_equal(out.reshape(3, -1)[:, keep], img.reshape(3, -1)[:, keep])  # only those move
    model = linear_model()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    t = model(x).argmax(1).detach()
    res = road(model, x, contributions(model, x, t).numpy(), t)
    assert set(res.scores) == {"road_morf", "road_lerf"} and res.curves["road_morf"].shape == (6, 1)
    with pytest.raises(HarnessError, match="percentages"):
        ROAD(percentages=[120])


def dense_imputation(image, pixels, noise, seed):
    """The ROAD imputation written out: a dense solve of each removed pixel = the weighted mean of
    its 8 neighbours (1/6 side, 1/12 diagonal, neighbours outside the image left out), then
    ``noise * randn(C, len(pixels))`` from numpy's global RNG seeded by ``seed``."""
    c, h, w = image.shape
    var = {int(p): v for v, p in enumerate(pixels)}
    a, b = np.zeros((len(var), len(var))), np.zeros((len(var), c))
    for p, v in var.items():
        r, q = divmod(p, w)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if (dr or dc) and 0 <= r + dr < h and 0 <= q + dc < w:
                    wt, nb = (1 / 12 if dr and dc else 1 / 6), (r + dr) * w + q + dc
                    a[v, v] += wt
                    if nb in var:
                        a[v, var[nb]] -= wt
                    else:
                        b[v] += wt * image.reshape(c, -1)[:, nb]
    out = image.reshape(c, -1).copy()
    if len(var):
        np.random.seed(seed)
        solved = np.linalg.solve(a, b).T if len(var) < h * w else np.zeros((c, len(var)))  # nothing kept: 0
        out[:, pixels] = solved + noise * np.random.randn(c, len(var))
    return out.reshape(c, h, w)


@pytest.mark.parametrize("solver", ["envelope", "sparse"])
def test_road_imputation_equals_a_dense_solve_and_quantus(solver, monkeypatch):
    """The batched imputation (envelope Cholesky compiled by numba for narrow images, scipy's
    sparse LU for wide ones or without numba) equals a dense solve of the system and Quantus'
    ``noisy_linear_imputation`` (same seed) on every share, from none to every pixel."""
    from quantus.functions.perturb_func import noisy_linear_imputation

    from harness.evaluation import road

    if solver == "sparse":
        monkeypatch.setattr(road, "_ENVELOPE_MAX_WIDTH", 0)
    elif road._compiled_kernel() is None:
        pytest.skip("numba is not installed: the sparse solver runs instead")
    rng = np.random.default_rng(3)
    for c, h, w in ((3, 9, 11), (1, 6, 6), (3, 12, 5)):
        images = rng.random((2, c, h, w))
        smooth = np.cumsum(np.cumsum(rng.standard_normal((2, h, w)), 1), 2).reshape(2, -1)  # blobs
        jobs = [(i, np.argsort(-m, kind="stable")[: int(h * w * p / 100)], 7 * i + j)
                for i, m in enumerate([rng.standard_normal(h * w), smooth[1]])
                for j, p in enumerate((0, 3, 10, 30, 50, 70, 90, 99, 100))]
        out = road.noisy_linear_imputation(images, jobs, noise=0.01)
        for (i, pixels, seed), got in zip(jobs, out):
            np.testing.assert_allclose(got, dense_imputation(images[i], pixels, 0.01, seed), rtol=0, atol=1e-9)
            if 0 < len(pixels) < h * w:
                with quiet():
                    np.random.seed(seed)
                    theirs = noisy_linear_imputation(images[i], pixels, noise=0.01)
                np.testing.assert_allclose(got, theirs, rtol=0, atol=1e-9)
        assert np.array_equal(out[0], images[0])  # no pixel removed: the image itself
    assert np.allclose(ROAD(noise=0.0).impute(images[0], np.array([7]), seed=0),
                       dense_imputation(images[0], np.array([7]), 0.0, 0), atol=1e-12)


def test_road_scores_equal_the_per_image_quantus_imputation():
    """ROAD's curves equal those of the loop it replaced: Quantus' imputation image by image and
    share by share, seeded per image, one model call per image."""
    from quantus.functions.perturb_func import noisy_linear_imputation

    model = conv_model(seed=4, size=16)
    x, a, _ = data(n=6, size=16, seed=5)
    a[3] = np.cumsum(np.cumsum(a[3], 0), 1)  # one smooth map: removed pixels form blobs
    t = model(x).argmax(1).detach()
    road = ROAD(percentages=[10, 30, 50, 70, 90, 100], noise=0.05, orders=["morf", "lerf"], batch_size=7, seed=2)
    res = road(model, x, a, t)
    xs = x.double().numpy()
    for o in ("morf", "lerf"):
        expected = np.zeros((6, 6))
        for i in range(6):
            rank = np.argsort(-a[i].reshape(-1) if o == "morf" else a[i].reshape(-1), kind="stable")
            imgs = []
            for j, p in enumerate(road.percentages):
                np.random.seed(image_seed(2, xs[i]) + j)
                with quiet():
                    imgs.append(noisy_linear_imputation(xs[i], rank[: int(256 * p / 100)], noise=0.05))
            expected[i] = (model(torch.from_numpy(np.stack(imgs)).float()).argmax(1) == t[i]).numpy()
        np.testing.assert_array_equal(res.curves[f"road_{o}"], expected)
    assert 0 < res.curves["road_morf"].mean() < 1  # not a trivial model: some classes change


class BrightSquare(nn.Module):
    """Class 0 while the mean of the square ``R`` (rows and columns 2-5) stays above 0.5."""

    def forward(self, x):
        inside = x[:, :, 2:6, 2:6].mean((1, 2, 3))
        return torch.stack([inside, torch.full_like(inside, 0.5)], 1)


def test_road_known_answer_perfect_and_inverted_maps():
    x = torch.full((1, 3, 8, 8), 0.1)
    x[:, :, 2:6, 2:6] = 0.9  # 16 of 64 pixels
    square = torch.zeros(8, 8)
    square[2:6, 2:6] = 1
    perfect = (square + 1e-3 * torch.rand(8, 8, generator=torch.Generator().manual_seed(0))).numpy()[None]
    t = torch.tensor([0])
    road = ROAD(percentages=[30], noise=0.0, orders=["morf", "lerf"])
    # 30 % = 19 pixels: MoRF on the perfect map imputes the whole square from the dark border: class lost.
    good = road(BrightSquare(), x, perfect, t).scores
    assert good["road_morf"][0] == 0.0 and good["road_lerf"][0] == 1.0
    bad = road(BrightSquare(), x, -perfect, t).scores  # inverted: background first, the square stays
    assert bad["road_morf"][0] == 1.0 and bad["road_lerf"][0] == 0.0
