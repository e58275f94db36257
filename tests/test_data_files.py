from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data.files import image_folder, npz_images, read_class_names
from harness.types import HarnessError


def test_image_folder_by_subfolder_skips_corrupt_images(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((5, 7, 3), 100, np.uint8)).save(tmp_path / cls / "a.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    data = image_folder(str(tmp_path))
    assert data.class_names == ["cat", "dog"] and list(data.labels) == [0, 1]
    assert data.images[0].shape == (5, 7, 3)
    assert [s[0] for s in data.skipped] == ["dog/broken.jpg"] and "unreadable" in data.skipped[0][1]


def test_image_folder_labels_from_names_and_tsv_classes(tmp_path):
    (tmp_path / "classes.tsv").write_text("index\tnames\n0\ttench, fish\n1\tgoldfish\n")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img_00_1.jpg")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "nolabel.jpg")
    data = image_folder(str(tmp_path), str(tmp_path / "classes.tsv"), "names", r"_(\d+)\.\w+$")
    assert data.class_names == ["tench", "goldfish"] and list(data.labels) == [1]
    assert data.skipped[0][0] == "nolabel.jpg"
    with pytest.raises(HarnessError, match="columns: index, names"):
        read_class_names(tmp_path / "classes.tsv", "wnid")


def test_npz_channels_first_or_last_and_clear_errors(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (3, 3, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.array([0, 1, 2]))
    data = npz_images(str(tmp_path / "d.npz"), start=1, n=2)
    assert len(data) == 2 and data.images[0].shape == (6, 6, 3)
    np.testing.assert_array_equal(data.images[0], imgs[1].transpose(1, 2, 0))
    with pytest.raises(HarnessError, match="no array"):
        npz_images(str(tmp_path / "d.npz"), labels_key="y")
    with pytest.raises(HarnessError, match="not found"):
        npz_images(str(tmp_path / "missing.npz"))


def test_an_oversized_image_is_skipped_before_decoding(tmp_path):
    """A decompression bomb (here: an image above a small max_pixels) is skipped and reported."""
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "small.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a" / "big.png")
    data = image_folder(str(tmp_path), max_pixels=100)
    assert data.ids == ["a/small.png"]
    assert data.skipped == [("a/big.png", "40x40 pixels, more than max_pixels=100 (a decompression bomb?)")]


def test_a_checkpoint_with_code_is_refused_without_unsafe_advice(tmp_path):
    import torch

    from harness.models.builders import load_weights
    from harness.types import HarnessError

    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Image.new("RGB", (1, 1))}, tmp_path / "pickled.pt")
    with pytest.raises(HarnessError) as e:
        load_weights(torch.nn.Linear(1, 1), tmp_path / "pickled.pt")
    assert "weights_only=False" not in str(e.value) and "save the weights alone" in str(e.value)


@pytest.mark.parametrize("image_id", ["../../etc/passwd", "/abs/path.png", "..", "a/../../b", "c:\\x\\..\\y"])
def test_image_ids_cannot_name_a_path_outside_the_artifact_folder(image_id):
    from harness.tracking.artifacts import safe_name

    name = safe_name(image_id)
    assert "/" not in name and "\\" not in name and name not in (".", "..")
    assert (Path("/store/overlays") / f"00000_{name}.png").resolve().parent == Path("/store/overlays")
