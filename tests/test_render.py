"""What the MLLM is shown: known attributions mark known pixels."""

import numpy as np
import pytest
from hydra.utils import instantiate

from conftest import make_cfg
from harness.render.views import Box, Boundaries, Heatmap, Masked, SideBySide, top_share_mask
from harness.types import HarnessError


def image(h=24, w=24):
    return np.random.default_rng(0).random((h, w, 3)) * 0.5


def test_masked_keeps_exactly_the_top_share():
    a = np.random.default_rng(1).random((24, 24))
    img = image()
    out = np.asarray(Masked(share=0.25, fill=0.5, size=None)(img, a)[0]) / 255
    keep = top_share_mask(a, 0.25)
    assert keep.sum() == 144
    np.testing.assert_allclose(out[keep], img[keep], atol=1 / 255)
    np.testing.assert_allclose(out[~keep], 0.5, atol=1 / 255)


def test_boundaries_enclose_the_top_superpixels():
    # grid superpixels of 6x6: the map is high on two cells, so those two are marked
    a = np.zeros((24, 24))
    a[6:12, 6:12], a[12:18, 18:24] = 2.0, 1.0
    r = Boundaries(top_k=2, segmentation="grid", patch=6, size=None, color=(1.0, 1.0, 0.0))
    marked, _ = r.region(image(), a)
    np.testing.assert_array_equal(marked, a > 0)
    out = np.asarray(r(image(), a)[0]) / 255
    yellow = (out[..., 0] > 0.99) & (out[..., 1] > 0.99) & (out[..., 2] < 0.01)
    ring = np.zeros((24, 24), bool)
    ring[6:12, 6:12] = True
    ring[7:11, 7:11] = False
    assert yellow[ring].all() and not yellow[7:11, 7:11].any() and yellow[12, 18] and not yellow[0:5].any()
    # mass: the fewest cells holding 60 % of the positive mass is the first cell alone (2/3 of it)
    only_first, _ = Boundaries(mass=0.6, segmentation="grid", patch=6, size=None).region(image(), a)
    np.testing.assert_array_equal(only_first, np.pad(np.ones((6, 6), bool), ((6, 12), (6, 12))))
    assert not Boundaries(segmentation="grid", patch=6, size=None).region(image(), -np.ones((24, 24)))[0].any()


def test_box_surrounds_the_most_relevant_region_and_size_enlarges():
    a = np.zeros((24, 24))
    a[4:9, 10:16] = 1.0  # 30 pixels ~ 5 % of the image
    a[20, 2] = 0.9
    r = Box(share=30 / 576, size=48, width=1)
    assert r.box(a) == (4, 10, 8, 15)
    out = np.asarray(r(image(), a)[0])
    assert out.shape == (48, 48, 3)
    red = (out[..., 0] == 255) & (out[..., 1] == 0) & (out[..., 2] == 0)
    assert red[8, 20:32].all() and red[8:18, 20].all() and not red[0:6].any()


def test_heatmap_and_side_by_side():
    a = np.zeros((24, 24))
    a[:12] = 1.0
    img = image()
    out = np.asarray(Heatmap(alpha=1.0, size=None)(img, a)[0]) / 255
    assert np.abs(out[:12] - img[:12]).mean() > 0.2  # coloured where relevant
    two = SideBySide(tiled=False, size=32)(img, a)
    assert len(two) == 2 and two[0].size == (32, 32)
    np.testing.assert_allclose(np.asarray(SideBySide(tiled=False, size=None)(img, a)[0]) / 255, img, atol=1 / 255)
    tiled = SideBySide(tiled=True, size=None)(img, a)
    assert len(tiled) == 1 and tiled[0].size[0] > 2 * 24
    with pytest.raises(HarnessError, match="colour map"):
        Heatmap(cmap="nope")(img, a)
    with pytest.raises(HarnessError, match=r"\(0, 1\]"):
        Masked(share=0)


@pytest.mark.parametrize("option", ["boundaries", "heatmap", "masked", "side_by_side", "box"])
def test_every_render_option_builds_and_renders(option):
    r = instantiate(make_cfg([f"render={option}"]).render)
    out = r(image(32, 32), np.random.default_rng(2).standard_normal((32, 32)))
    assert 1 <= len(out) <= 2 and min(out[0].size) == 336
