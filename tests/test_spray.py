"""SpRAy (harness.revise.spray) on synthetic 32x32 heatmaps: a Clever-Hans sub-population of identical corner maps
is found as its own cluster, ranked first; a class of object-like blobs anywhere stays one cluster."""

from __future__ import annotations

import numpy as np
import pytest

from harness.revise.spray import ClassClusters, preprocess, spray, spray_figure

S = 32


def blobs(rng, n: int, noise: float = 0.01) -> np.ndarray:
    """``n`` maps, each a Gaussian blob (sigma 3 px) at a random position, plus Gaussian noise."""
    yy, xx = np.mgrid[:S, :S]
    centres = rng.uniform(4, S - 4, (n, 2))
    maps = np.exp(-((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2) / (2 * 3.0**2))
    return maps + noise * rng.standard_normal((n, S, S))


def corners(rng, n: int, noise: float = 0.01) -> np.ndarray:
    """``n`` maps with all their mass on the top-left 3x3 pixels, plus Gaussian noise."""
    maps = np.zeros((n, S, S))
    maps[:, :3, :3] = 1.0
    return maps + noise * rng.standard_normal((n, S, S))


@pytest.fixture(scope="module")
def data():
    """Class 0: 40 blobs and 20 corner maps, shuffled; class 1: 60 blobs. Labels interleaved with the classes'
    images spread over the arrays, so indices into the input arrays are checked."""
    rng = np.random.default_rng(0)
    class0 = np.concatenate([blobs(rng, 40), corners(rng, 20)])
    is_corner0 = np.arange(60) >= 40
    perm = rng.permutation(60)
    class0, is_corner0 = class0[perm], is_corner0[perm]
    class1 = blobs(rng, 60)
    maps = np.empty((120, S, S))
    labels = np.tile([0, 1], 60)
    maps[labels == 0], maps[labels == 1] = class0, class1
    is_corner = np.zeros(120, dtype=bool)
    is_corner[labels == 0] = is_corner0
    return maps, labels, is_corner


@pytest.fixture(scope="module")
def result(data):
    maps, labels, _ = data
    return spray(maps, labels)


def test_clever_hans_subpopulation_is_the_top_cluster(data, result):
    _, labels, is_corner = data
    c0 = result.classes[0]
    assert isinstance(c0, ClassClusters) and c0.label == 0
    np.testing.assert_array_equal(c0.index, np.flatnonzero(labels == 0))
    assert c0.k >= 2
    assert c0.eigengap >= 0.9  # the relative gap after a (near-)zero eigenvalue: a separate component
    assert c0.eigenvalues[0] == pytest.approx(0.0, abs=1e-8) and np.all(np.diff(c0.eigenvalues) >= -1e-12)
    top = result.top(0)
    assert len(top) >= 18
    assert np.all(labels[top] == 0)
    assert is_corner[top].mean() >= 0.9  # nearly all the top cluster are corner maps ...
    assert is_corner[top].sum() >= 18  # ... and nearly all corner maps are in it
    mean = c0.mean_maps[c0.order[0]]
    assert mean.shape == (8, 8) and mean.sum() == pytest.approx(1.0)
    assert mean[0, 0] > 0.5  # most of the mass in the top-left cell
    t = c0.tightness[c0.order]
    assert t[0] < 0.5 < t[-1] and np.all(np.diff(t) >= 0)  # the corner maps are alike, the blobs are not
    np.testing.assert_array_equal(np.sort(np.concatenate([c0.members(c) for c in range(c0.k)])), c0.index)


def test_blobs_anywhere_are_one_cluster(result):
    c1 = result.classes[1]
    assert c1.label == 1 and c1.k == 1
    assert c1.eigengap < 0.9
    assert len(result.top(1)) == 0
    assert np.all(c1.assignment == 0) and c1.tightness[0] == pytest.approx(1.0)
    s = result.summary()
    assert s["spray_classes"] == 2 and s["spray_classes_split"] == 1
    assert s["spray_max_eigengap"] == pytest.approx(result.classes[0].eigengap)


def test_deterministic(data, result):
    maps, labels, _ = data
    again = spray(maps, labels, seed=0)
    for a, b in zip(result.classes, again.classes, strict=True):
        np.testing.assert_array_equal(a.assignment, b.assignment)
        np.testing.assert_array_equal(a.order, b.order)
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues)


def test_preprocess_area_average_and_empty_maps():
    m = np.zeros((3, 30, 20))
    m[0, :15, :10] = 2.0  # exactly the top-left quarter at size 2
    m[1, :15, :10] = -1.0  # negative only: no positive mass (its absolute value would be the top-left quarter)
    m[2, 0, 0] = np.nan
    out = preprocess(m, size=2)
    np.testing.assert_allclose(out[0], [[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(out[1], 0.25)
    np.testing.assert_allclose(out[2], 0.25)
    np.testing.assert_allclose(preprocess(np.arange(16.0).reshape(1, 4, 4), size=2)[0] * 120,
                               [[10, 18], [42, 50]])  # reshape-mean of 2x2 blocks, normalised by the sum 120


def test_zero_maps_small_class_and_figure(data, result, tmp_path, caplog):
    maps, labels, _ = data
    maps = maps.copy()
    maps[0] = 0.0
    maps[1] = -np.abs(maps[1])
    extra = np.zeros((5, S, S))  # a class of 5 images: too small to cluster
    with caplog.at_level("INFO", logger="harness.revise.spray"):
        r = spray(np.concatenate([maps, extra]), np.concatenate([labels, np.full(5, 7)]))
    assert [c.label for c in r.classes] == [0, 1, 7]
    small = r.classes[2]
    assert small.k == 1 and np.isnan(small.eigengap) and len(r.top(7)) == 0
    np.testing.assert_allclose(small.mean_maps[0], 1 / 64)
    assert "class 7 has 5 images" in caplog.text
    assert r.classes[0].k >= 2
    path = spray_figure(r, tmp_path / "fig" / "spray.png", class_names={0: "zero", 1: "one"})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    path2 = spray_figure(result, tmp_path / "spray2.png", class_names=["a", "b"], max_clusters=1)
    assert path2.stat().st_size > 1000
    with pytest.raises(KeyError):
        r.top(3)
    with pytest.raises(ValueError):
        spray(maps[:3], labels[:2])
