import numpy as np
import pytest

from harness.data.shapes import SHAPES, make_shapes
from harness.types import HarnessError


def test_same_seed_same_images_and_splits_differ():
    a, b = make_shapes(n=12, seed=3), make_shapes(n=12, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert np.array_equal(a.labels, b.labels)
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
    other = make_shapes(n=12, seed=3, split="train")
    assert not any(np.array_equal(x, y) for x, y in zip(a.images, other.images))
    assert not np.array_equal(a.images[0], make_shapes(n=1, seed=4).images[0])


def test_masks_cover_exactly_the_drawn_shape():
    # Flat background: every pixel off the mask has the background colour, every pixel on it the
    # shape colour, and the two differ: the mask is exactly the object.
    s = make_shapes(n=30, image_size=40, classes=list(SHAPES), background="flat")
    for img, mask in zip(s.images, s.masks):
        assert mask.shape == img.shape[:2] and 20 < mask.sum() < 0.7 * mask.size
        inside, outside = img[mask], img[~mask]
        assert (inside == inside[0]).all() and (outside == outside[0]).all()
        assert not np.array_equal(inside[0], outside[0])


def test_classes_balanced_and_images_vary():
    s = make_shapes(n=400, seed=1)
    counts = np.bincount(s.labels, minlength=4)
    assert counts.min() > 70
    centres = [np.argwhere(m).mean(0) for m in s.masks]
    assert np.std(centres, axis=0).min() > 1.5  # objects at different positions
    areas = [m.sum() for m in s.masks]
    assert max(areas) > 1.5 * min(areas)  # and scales


def test_spurious_mark_in_corner_with_class_colour_and_not_in_mask():
    s = make_shapes(n=40, background="flat", spurious_prob=1.0, spurious_size=3)
    corner = {}
    for img, mask, y in zip(s.images, s.masks, s.labels):
        assert not mask[:3, :3].any()
        patch = img[:3, :3].reshape(-1, 3)
        assert (patch == patch[0]).all()
        corner.setdefault(int(y), set()).add(tuple(patch[0]))
    assert all(len(c) == 1 for c in corner.values())  # one colour per class
    assert len({next(iter(c)) for c in corner.values()}) == len(corner)  # distinct across classes
    none = make_shapes(n=40, background="flat", spurious_prob=0.0)
    assert sum((im[:3, :3].reshape(-1, 3) == [255, 0, 0]).all() for im in none.images) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [({"classes": ["circle", "blob"]}, "blob"), ({"split": "dev"}, "train, val, test"),
     ({"background": "sky"}, "noise, texture")],
)
def test_bad_arguments_name_the_valid_values(kwargs, message):
    with pytest.raises(HarnessError, match=message):
        make_shapes(n=2, **kwargs)
