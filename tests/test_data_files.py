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


def _decoded(tmp_path, name, save):
    """The one image ``save`` writes, decoded by ``image_folder`` (a folder of its own)."""
    root = tmp_path / name.replace(".", "_")
    (root / "c").mkdir(parents=True)
    save(root / "c" / name)
    data = image_folder(str(root))
    assert not data.skipped, data.skipped
    return data.images[0]


def test_image_formats_decode_to_the_expected_8_bit_rgb(tmp_path):
    """16-bit grey, palette (with and without transparency), CMYK, grey, 1-bit, RGBA and LA, and
    an EXIF-rotated image each become the 8-bit RGB a viewer shows."""
    grey16 = np.full((4, 4), 32896, np.uint16)  # 32896 / 65535 * 255 = 128
    got = _decoded(tmp_path, "g16.png", lambda p: Image.fromarray(grey16).save(p))
    assert got.dtype == np.uint8 and got.shape == (4, 4, 3) and (got == 128).all()  # Pillow's convert gave 255

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1])
    got = _decoded(tmp_path, "p.png", lambda p: pal.save(p))
    assert got.tolist() == [[[255, 0, 0], [0, 0, 255]]]
    got = _decoded(tmp_path, "pt.png", lambda p: pal.save(p, transparency=1))
    assert got.tolist() == [[[255, 0, 0], [255, 255, 255]]]  # the transparent index over white

    cmyk = Image.new("CMYK", (1, 1), (255, 0, 0, 0))  # pure cyan
    assert _decoded(tmp_path, "k.tif", lambda p: cmyk.save(p)).tolist() == [[[0, 255, 255]]]
    assert _decoded(tmp_path, "l.png", lambda p: Image.new("L", (1, 1), 77).save(p)).tolist() == [[[77, 77, 77]]]
    assert _decoded(tmp_path, "b.png", lambda p: Image.new("1", (1, 1), 1).save(p)).tolist() == [[[255, 255, 255]]]

    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(10, 20, 30, 255), (10, 20, 30, 0)])
    assert _decoded(tmp_path, "a.png", lambda p: rgba.save(p)).tolist() == [[[10, 20, 30], [255, 255, 255]]]
    la = Image.new("LA", (1, 1), (0, 128))  # black at half opacity over white
    assert _decoded(tmp_path, "la.png", lambda p: la.save(p)).tolist() == [[[127, 127, 127]]]

    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the viewer turns it 90 degrees clockwise
    got = _decoded(tmp_path, "r.png", lambda p: Image.fromarray(a).save(p, exif=exif))
    np.testing.assert_array_equal(got, np.rot90(a, k=-1))


def test_npz_16_bit_is_scaled_and_nan_is_an_error_naming_where(tmp_path):
    labels = np.zeros(2, np.int64)
    np.savez(tmp_path / "u16.npz", images=np.full((2, 4, 4, 3), 65535, np.uint16), labels=labels)
    assert (npz_images(str(tmp_path / "u16.npz")).images[0] == 255).all()  # not 65535 % 256
    bad = np.zeros((2, 4, 4, 3), np.float32)
    bad[1, 2, 3, 0] = np.nan
    bad[0, 0, 1, 2] = np.inf
    np.savez(tmp_path / "nan.npz", images=bad, labels=labels)
    with pytest.raises(HarnessError, match=r"nan.npz:images has 2 NaN or infinite pixel values, first at "
                                           r"\[image, row, column, channel\] \[0, 0, 1, 2\], \[1, 2, 3, 0\]"):
        npz_images(str(tmp_path / "nan.npz"))


def test_labels_by_wordnet_id_or_name_and_checked_against_the_classes(tmp_path):
    classes = tmp_path / "classes.tsv"
    classes.write_text("index\twnid\tnames\n0\tn01440764\ttench, Tinca tinca\n1\tn01443537\tgoldfish\n"
                       "2\tn01484850\tgreat white shark, white shark\n")
    flat = tmp_path / "flat"
    flat.mkdir()
    px = lambda: Image.fromarray(np.zeros((4, 4, 3), np.uint8))  # noqa: E731
    for name in ("n01440764_tench.JPEG", "n01484850_0001.png", "n09999999_unknown.png"):
        px().save(flat / name, format="PNG")
    data = image_folder(str(flat), str(classes), "names", r"^(n\d{8})_")
    assert dict(zip(data.ids, data.labels.tolist())) == {"n01440764_tench.JPEG": 0, "n01484850_0001.png": 2}
    assert data.class_names == ["tench", "goldfish", "great white shark"]
    assert data.skipped == [("n09999999_unknown.png", f"'n09999999' names no class of {classes}")]
    by_name = tmp_path / "by_name"
    by_name.mkdir()
    px().save(by_name / "goldfish-1.png")
    px().save(by_name / "7-1.png")  # an index beyond the 3 classes
    data = image_folder(str(by_name), str(classes), "names", r"^([\w ]+?)-\d")
    assert dict(zip(data.ids, data.labels.tolist())) == {"goldfish-1.png": 1}
    assert data.skipped == [("7-1.png", "label 7 is not a class index (the class file has 3)")]
    folders = tmp_path / "folders"
    (folders / "n01443537").mkdir(parents=True)
    px().save(folders / "n01443537" / "a.png")
    assert image_folder(str(folders), str(classes), "names").labels.tolist() == [1]  # ImageNet's train layout
