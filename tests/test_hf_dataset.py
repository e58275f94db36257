"""dataset=hf: one split of a Hugging Face ``datasets`` dataset, read from a save_to_disk folder,
parquet, an image folder, or the hub cache, with the same pixels and labels as the npz it came from."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from harness import CONF_DIR
from harness.data.files import npz_images
from harness.data.hf import hf_dataset
from harness.types import HarnessError, ImageSet

datasets = pytest.importorskip("datasets")

NAMES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def arrays():
    """12 random 6x5 images of 3 classes, the first 8 the ``train`` split, the rest ``test``."""
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (12, 6, 5, 3), dtype=np.uint8))
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 1, 0])
    return images, labels


def _hf(images, labels, **extra_columns):
    features = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=NAMES),
                                  **{k: datasets.Value("string") for k in extra_columns}})
    return datasets.Dataset.from_dict({"picture": list(images), "kind": list(map(int, labels)), **extra_columns},
                                      features=features)


@pytest.fixture(scope="module")
def written(arrays, tmp_path_factory):
    """The same 12 images as (a) a DatasetDict save_to_disk folder, (b) an image folder with
    split sub-folders, (c) parquet files named by split, (d) an npz per split."""
    images, labels = arrays
    root = tmp_path_factory.mktemp("hf")
    splits = {"train": slice(0, 8), "test": slice(8, 12)}
    dd = datasets.DatasetDict({s: _hf(images[sl], labels[sl]) for s, sl in splits.items()})
    dd.save_to_disk(str(root / "disk"))
    (root / "parquet").mkdir()
    for s, sl in splits.items():
        dd[s].to_parquet(str(root / "parquet" / f"{s}.parquet"))
        np.savez(root / f"{s}.npz", images=np.stack(images[sl]), labels=labels[sl])
        for i, (im, lab) in enumerate(zip(images[sl], labels[sl], strict=True)):
            folder = root / "folder" / s / NAMES[lab]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(folder / f"{i:02d}.png")
    return root


def _npz(root: Path, split: str) -> ImageSet:
    return npz_images(str(root / f"{split}.npz"))


def _same(got: ImageSet, ref: ImageSet, ordered: bool = True) -> None:
    assert len(got) == len(ref) and not got.skipped
    assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in got.images)
    pairs = [(im.tobytes(), int(lab)) for im, lab in zip(got.images, got.labels, strict=True)]
    want = [(im.tobytes(), int(lab)) for im, lab in zip(ref.images, ref.labels, strict=True)]
    assert (pairs if ordered else sorted(pairs)) == (want if ordered else sorted(want))


@pytest.mark.parametrize("kind", ["disk", "parquet", "folder"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_kind_of_local_dataset_gives_the_npz_pixels_and_labels(kind, split, written, tmp_path):
    data = hf_dataset(str(written / kind), split=split, cache_dir=str(tmp_path))
    _same(data, _npz(written, split), ordered=kind != "folder")  # imagefolder: files by class folder
    assert data.class_names == NAMES
    assert data.ids[0] == f"{kind}-{split}-000000" and len(set(data.ids)) == len(data)


def test_a_single_parquet_file_and_a_dataset_without_splits(written, arrays, tmp_path):
    ref = _npz(written, "test")
    _same(hf_dataset(str(written / "parquet" / "test.parquet"), cache_dir=str(tmp_path)), ref)
    datasets.load_from_disk(str(written / "disk" / "test")).save_to_disk(str(tmp_path / "one"))
    one = hf_dataset(str(tmp_path / "one"), split="whatever")  # a Dataset has no splits: read whole
    _same(one, ref)
    assert one.ids[0] == "one-whatever-000000"
    plain = tmp_path / "plain"
    for i, (im, lab) in enumerate(zip(*arrays, strict=True)):
        (plain / NAMES[lab]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(plain / NAMES[lab] / f"{i:02d}.png")
    data = hf_dataset(str(plain), cache_dir=str(tmp_path / "cache"))  # root/<class>/<image>: no split
    assert len(data) == 12 and data.class_names == NAMES
    assert sorted(data.labels.tolist()) == sorted(arrays[1].tolist())
    single = tmp_path / "single" / "fox"
    single.mkdir(parents=True)
    Image.fromarray(arrays[0][0]).save(single / "a.png")
    data = hf_dataset(str(single.parent), cache_dir=str(tmp_path / "cache"))  # one class folder: labelled too
    assert data.class_names == ["fox"] and data.labels.tolist() == [0]


@pytest.mark.parametrize("kind", ["disk", "parquet", "folder"])
def test_a_missing_split_lists_the_splits(kind, written, tmp_path):
    with pytest.raises(HarnessError, match=r"has no split 'validation'; splits: (train, test|test, train)"):
        hf_dataset(str(written / kind), split="validation", cache_dir=str(tmp_path))


def test_n_indices_and_classes_select_rows(written, arrays):
    images, labels = arrays
    disk = str(written / "disk")
    data = hf_dataset(disk, split="train", n=3)
    assert data.ids == [f"disk-train-{i:06d}" for i in range(3)]
    data = hf_dataset(disk, split="train", indices=[5, 1, 7])
    assert data.ids == ["disk-train-000005", "disk-train-000001", "disk-train-000007"]
    np.testing.assert_array_equal(data.images[0], images[5])
    assert data.labels.tolist() == [labels[5], labels[1], labels[7]]
    data = hf_dataset(disk, split="train", classes=["fox", 0], n=4)  # by name or index, labels unchanged
    assert data.labels.tolist() == [0, 2, 0, 2] and data.class_names == NAMES
    assert data.ids == [f"disk-train-{i:06d}" for i in (0, 2, 3, 5)]
    data = hf_dataset(disk, split="train", indices=[7, 6, 5], classes=["dog"])
    assert data.ids == ["disk-train-000007"]
    with pytest.raises(HarnessError, match=r"\['wolf'\] name no class .*classes: cat, dog, fox"):
        hf_dataset(disk, classes=["wolf"])
    with pytest.raises(HarnessError, match=r"out of range: split 'test' .* has rows 0..3"):
        hf_dataset(disk, indices=[4])


def test_columns_are_detected_and_a_missing_one_is_listed(written, tmp_path):
    disk = str(written / "disk")
    assert len(hf_dataset(disk, image_column="picture", label_column="kind")) == 4
    with pytest.raises(HarnessError, match=r"no column 'image' \(dataset.image_column\); columns: "
                                           r"picture \(Image\), kind \(ClassLabel\)"):
        hf_dataset(disk, image_column="image")
    with pytest.raises(HarnessError, match=r"no column 'label' \(dataset.label_column\); columns: picture"):
        hf_dataset(disk, label_column="label")
    # no Image or ClassLabel feature: arrays in ``img`` (channels first) and integer ``label``
    rng = np.random.default_rng(1)
    chw = rng.integers(0, 256, (3, 3, 4, 5), dtype=np.uint8)
    datasets.Dataset.from_dict({"id": ["a", "b", "c"], "img": chw.tolist(), "label": [2, 0, 1]}).save_to_disk(
        str(tmp_path / "arrays"))
    data = hf_dataset(str(tmp_path / "arrays"))
    np.testing.assert_array_equal(data.images[1], chw[1].transpose(1, 2, 0))
    assert data.labels.tolist() == [2, 0, 1] and data.class_names == ["0", "1", "2"]
    datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(tmp_path / "none"))
    with pytest.raises(HarnessError, match=r"no image column .*one of: x \(Value\)"):
        hf_dataset(str(tmp_path / "none"))


def test_class_names_from_the_class_label_feature_or_a_file(written, tmp_path):
    assert hf_dataset(str(written / "disk")).class_names == NAMES
    (tmp_path / "names.txt").write_text("Felis\nCanis\nVulpes\n")
    data = hf_dataset(str(written / "disk"), classes_file=str(tmp_path / "names.txt"), classes=["Vulpes"])
    assert data.class_names == ["Felis", "Canis", "Vulpes"] and set(data.labels.tolist()) == {2}
    rng = np.random.default_rng(2)
    ims = [rng.integers(0, 256, (3, 3, 3), dtype=np.uint8) for _ in range(3)]
    text = datasets.Dataset.from_dict({"image": ims, "label": ["zebra", "ant", "zebra"]},
                                      features=datasets.Features(image=datasets.Image(),
                                                                 label=datasets.Value("string")))
    text.save_to_disk(str(tmp_path / "text"))
    data = hf_dataset(str(tmp_path / "text"))  # text labels without a file: the sorted names
    assert data.class_names == ["ant", "zebra"] and data.labels.tolist() == [1, 0, 1]


def test_a_hub_name_offline_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "home" / "datasets"))
    # the libraries read these at import: set their copies too (restored after the test)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "home" / "datasets")
    with pytest.raises(HarnessError) as e:
        hf_dataset("harness-tests/no-such-dataset", cache_dir=str(tmp_path / "cache"))
    msg = str(e.value)
    assert "harness-tests/no-such-dataset" in msg and "Traceback" not in msg
    for advice in ("dataset.path", "save_to_disk", "parquet", "image folder", "network", "HF_HOME",
                   "dataset.cache_dir"):
        assert advice in msg
    with pytest.raises(HarnessError, match="not found"):
        hf_dataset(str(tmp_path / "no" / "such" / "folder"))


def test_a_hub_split_it_lacks_lists_its_splits(monkeypatch):
    def load_dataset(path, name=None, split=None, cache_dir=None):
        raise ValueError(f'Unknown split "{split}". Should be one of [\'train\', \'test\'].')

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(HarnessError, match=r"^owner/set \(configuration 'small'\) has no split 'val'; "
                                           r"splits: train, test \(set dataset.split\)$"):
        hf_dataset("owner/set", name="small", split="val")


def test_a_corrupt_or_oversized_image_is_skipped_with_its_reason(arrays, tmp_path):
    images = arrays[0]
    good = [{"bytes": _png(im), "path": None} for im in images[:4]]
    rows = [good[0], {"bytes": b"not a png", "path": None}, good[1], None, good[2], _png_dict(40, 40)]
    ds = datasets.Dataset.from_dict(
        {"image": rows, "label": [0, 1, 2, 0, -1, 1]},
        features=datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=NAMES)))
    ds.save_to_disk(str(tmp_path / "bad"))
    data = hf_dataset(str(tmp_path / "bad"), max_pixels=1000)
    assert data.ids == ["bad-test-000000", "bad-test-000002"]
    np.testing.assert_array_equal(data.images[1], images[1])
    why = dict(data.skipped)
    assert list(why) == ["bad-test-000001", "bad-test-000003", "bad-test-000004", "bad-test-000005"]
    assert why["bad-test-000001"].startswith("unreadable image")
    assert why["bad-test-000003"].startswith("no image")
    assert why["bad-test-000004"].startswith("no label")
    assert "max_pixels=1000" in why["bad-test-000005"]
    assert hf_dataset(str(tmp_path / "bad"), max_pixels=1000, n=1).ids == ["bad-test-000000"]


def _png(im: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    return buf.getvalue()


def _png_dict(h: int, w: int) -> dict:
    return {"bytes": _png(np.zeros((h, w, 3), np.uint8)), "path": None}


def test_the_yaml_writes_the_code_defaults_and_documents_every_argument():
    yaml = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "dataset" / "hf.yaml"))
    params = inspect.signature(hf_dataset).parameters
    assert yaml.pop("_target_") == "harness.data.hf.hf_dataset"
    assert list(yaml) == list(params)
    for key, value in yaml.items():
        default = params[key].default
        assert value == ("???" if default is inspect.Parameter.empty else default), key
        assert f"{key}:" in inspect.getdoc(hf_dataset)
    text = (Path(CONF_DIR) / "dataset" / "hf.yaml").read_text()
    assert all("#" in line for line in text.splitlines() if line.split(":")[0] in params)


def test_dataset_hf_composes_validates_and_instantiates(written, tmp_path):
    from conftest import make_cfg
    from hydra.utils import instantiate

    from harness.validate import first_job_problem

    args = ["dataset=hf", f"dataset.path={written / 'disk'}", "dataset.split=train", "dataset.indices=[3,1]",
            "dataset.classes=[cat,dog]", f"dataset.cache_dir={tmp_path}"]
    assert first_job_problem(args, Path(CONF_DIR)) is None
    assert "dataset.n=0" in (first_job_problem([*args, "dataset.n=0"], Path(CONF_DIR)) or "")
    data = instantiate(make_cfg(args).dataset)
    assert isinstance(data, ImageSet) and data.ids == ["disk-train-000003", "disk-train-000001"]
    assert data.labels.tolist() == [0, 1] and data.class_names == NAMES
