"""Images through the Hugging Face ``datasets`` library: a hub dataset (from the cache when offline),
a ``save_to_disk`` folder, parquet files or a plain image folder."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from harness.data.files import (
    IMAGE_SUFFIXES,
    class_lookup,
    read_class_names,
    to_rgb8,
    to_uint8,
)
from harness.types import HarnessError, ImageSet

log = logging.getLogger(__name__)

_DISK_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


def hf_dataset(
    path: str,
    name: str | None = None,
    split: str = "test",
    n: int | None = None,
    indices: list[int] | None = None,
    classes: list[str | int] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    classes_file: str | None = None,
    cache_dir: str | None = None,
    max_pixels: int = 89_478_485,
) -> ImageSet:
    """Images and labels of one split of a Hugging Face ``datasets`` dataset.

    Args:
        path: what to load, tried in this order: a folder written by ``Dataset.save_to_disk`` or
            ``DatasetDict.save_to_disk`` (it holds ``dataset_dict.json``, or ``dataset_info.json``
            and ``state.json``): ``datasets.load_from_disk``; a ``.parquet`` file or a folder with
            ``.parquet`` files: the ``parquet`` builder; another folder: the ``imagefolder`` builder
            (``root/<class>/<image>``, or ``root/<split>/<class>/<image>``); anything else: a hub
            dataset name (``uoft-cs/cifar10``), read from the cache when the hub cannot be reached.
        name: the hub dataset's configuration (``None``: its default).
        split: the split to read. A dataset without splits (a ``Dataset.save_to_disk`` folder, a
            single ``.parquet`` file, a folder whose file and sub-folder names name no split) is
            read whole, whatever ``split`` says. A split the dataset lacks is an error that lists
            the splits it has.
        n: keep only the first ``n`` images after ``indices`` and ``classes`` (``None``: all).
        indices: row indices of the split to read, in this order (``None``: every row).
        classes: keep only images of these classes, by name (as ``classes_file`` or the label
            feature names them) or by index; labels keep their indices in the full class list.
        image_column: the column holding the images; ``None``: the first column of feature type
            ``datasets.Image``, else a column named ``image`` or ``img`` (arrays, ``[H, W]``,
            ``[H, W, C]`` or ``[C, H, W]``, are taken too).
        label_column: the column holding the labels; ``None``: the first ``ClassLabel`` column,
            else ``label`` or ``labels``. Integer labels are class indices; text labels are
            looked up in ``classes_file`` (any name it gives a class), or, without one, the
            sorted distinct texts are the classes.
        classes_file: class names in index order (``.txt``, or ``.tsv`` with the names in its
            first column); overrides the names a ``ClassLabel`` feature gives. Without either,
            the classes are named ``0`` … ``max(label)``.
        cache_dir: where ``datasets`` keeps downloaded and prepared data (``None``: its default,
            ``$HF_DATASETS_CACHE`` or ``$HF_HOME/datasets``); not used for ``save_to_disk``
            folders.
        max_pixels: an image with more pixels (width × height, read from its header before
            decoding) is skipped as a possible decompression bomb; the default is Pillow's own
            limit (``PIL.Image.MAX_IMAGE_PIXELS``).

    Ids are ``<dataset stem>-<split>-<row index in the split, 6 digits>``. Rows whose image cannot
    be decoded, or that have no label (``-1`` or empty), are skipped and listed in
    ``ImageSet.skipped``.
    """
    import datasets

    ds, stem, split = _load(path, name, split, cache_dir)
    columns = list(ds.column_names)
    features = ds.features
    image_col = _column("image", image_column, features, columns, path, datasets.Image, ("image", "img"))
    label_col = _column("label", label_column, features, columns, path, datasets.ClassLabel, ("label", "labels"),
                        exclude=image_col)

    feature = features[label_col]
    raw_labels = list(ds[label_col])
    if classes_file:
        names = read_class_names(classes_file)
    elif isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        names = None
    labels = _label_indices(raw_labels, feature, names, classes_file, path, label_col)
    if names is None:
        if any(isinstance(v, str) for v in raw_labels):
            names = sorted({v for v in raw_labels if isinstance(v, str) and v != ""})
            labels = [names.index(v) if isinstance(v, str) and v in names else None for v in raw_labels]
        else:
            known = [v for v in labels if v is not None]
            names = [str(i) for i in range(max(known) + 1)] if known else []

    rows = list(range(len(ds)))
    if indices is not None:
        bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < len(ds)]
        if bad:
            raise HarnessError(f"dataset.indices {bad[:5]} out of range: split {split!r} of {path} has rows "
                               f"0..{len(ds) - 1}")
        rows = [int(i) for i in indices]
    if classes is not None:
        keep = _class_indices(classes, names, path)
        rows = [r for r in rows if labels[r] in keep]
        if not rows:
            raise HarnessError(f"no rows of classes {list(classes)} in split {split!r} of {path}"
                               + (" at dataset.indices" if indices is not None else ""))

    image_feature = features[image_col]
    is_image = isinstance(image_feature, datasets.Image)
    raw = ds.select_columns([image_col])
    if is_image:
        raw = raw.cast_column(image_col, datasets.Image(decode=False))
    images, out_labels, ids, skipped = [], [], [], []
    for r in rows:
        if n is not None and len(images) >= n:
            break
        rid = f"{stem}-{split}-{r:06d}"
        if labels[r] is None:
            v = raw_labels[r]
            skipped.append((rid, f"label {v!r} names no class" + (f" of {classes_file}" if classes_file else "")
                            if isinstance(v, str) and v else f"no label (column {label_col!r} holds {v!r})"))
            continue
        if not 0 <= labels[r] < len(names):
            skipped.append((rid, f"label {labels[r]} is not a class index (there are {len(names)} classes)"))
            continue
        value = raw[r][image_col]
        try:
            img, why = _decode(value, max_pixels)
        except HarnessError as e:
            img, why = None, f"unreadable image: {e}"
        if img is None:
            skipped.append((rid, why))
            continue
        images.append(img)
        out_labels.append(labels[r])
        ids.append(rid)
    for rid, why in skipped:
        log.warning("skipped %s: %s", rid, why)
    return ImageSet(images=images, labels=np.array(out_labels, dtype=np.int64), ids=ids,
                    class_names=names, skipped=skipped)


# --- loading -------------------------------------------------------------------------------------

def _load(path: str, name: str | None, split: str, cache_dir: str | None) -> tuple[Any, str, str]:
    """(the split as a ``datasets.Dataset``, the dataset's stem for ids, the split's name)."""
    import datasets

    p = Path(path).expanduser()
    if p.is_dir() and any((p / m).is_file() for m in _DISK_MARKERS):
        try:
            loaded = datasets.load_from_disk(str(p))
        except (OSError, ValueError, KeyError) as e:
            raise HarnessError(f"{p} looks like a save_to_disk folder but could not be read: {e}") from None
        return _pick(loaded, split, p), p.name, split
    if p.is_file() and p.suffix == ".parquet":
        ds = _local("parquet", p, split, cache_dir, data_files={split: str(p)})
        return ds, p.stem, split
    if p.is_dir():
        builder = "parquet" if any(p.rglob("*.parquet")) else "imagefolder"
        if builder == "imagefolder" and not any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.rglob("*")):
            raise HarnessError(f"{p} has no save_to_disk files ({', '.join(_DISK_MARKERS)}), no .parquet files "
                               f"and no images ({', '.join(IMAGE_SUFFIXES)})")
        return _local(builder, p, split, cache_dir), p.name, split
    if p.exists():
        raise HarnessError(f"{p} is neither a folder nor a .parquet file")
    if path.startswith((".", "/", "~")) or path.endswith(".parquet") or path.count("/") > 1:
        raise HarnessError(f"dataset.path {path!r} not found (and it is no hub name, which reads 'owner/name')")
    return _hub(path, name, split, cache_dir), path.rstrip("/").split("/")[-1], split


def _local(builder: str, folder: Path, split: str, cache_dir: str | None, data_files: Any = None) -> Any:
    """A split of a local folder or file read by a packaged builder (``parquet``, ``imagefolder``)."""
    import datasets
    from datasets.data_files import DEFAULT_PATTERNS_ALL, get_data_patterns

    try:
        if data_files is not None:
            loaded = datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir)
        else:
            extra = {"drop_labels": False} if builder == "imagefolder" else {}  # one class folder: labels too
            loaded = datasets.load_dataset(builder, data_dir=str(folder), cache_dir=cache_dir, **extra)
            if get_data_patterns(str(folder)) == DEFAULT_PATTERNS_ALL and len(loaded) == 1:
                return next(iter(loaded.values()))  # no split in the names: the folder is the dataset
    except HarnessError:
        raise
    except Exception as e:  # noqa: BLE001 - the builder's own message, without its stack
        raise HarnessError(f"could not read {folder} with the datasets {builder!r} builder: "
                           f"{type(e).__name__}: {e}") from None
    return _pick(loaded, split, folder)


def _pick(loaded: Any, split: str, where: Any) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise HarnessError(f"{where} has no split {split!r}; splits: {', '.join(loaded)} (set dataset.split)")
        return loaded[split]
    if isinstance(loaded, datasets.Dataset):
        return loaded
    raise HarnessError(f"{where}: expected a Dataset or DatasetDict, got {type(loaded).__name__}")


def _hub(path: str, name: str | None, split: str, cache_dir: str | None) -> Any:
    import datasets

    label = path + (f" (configuration {name!r})" if name else "")
    try:
        return datasets.load_dataset(path, name, split=split, cache_dir=cache_dir)
    except ValueError as e:
        m = re.search(r'Unknown split "[^"]*"\. Should be one of \[(.*)\]', str(e))
        if m:
            splits = ", ".join(s.strip().strip("'\"") for s in m[1].split(","))
            raise HarnessError(f"{label} has no split {split!r}; splits: {splits} (set dataset.split)") from None
        raise HarnessError(f"could not load {label}: {e}") from None
    except (ConnectionError, FileNotFoundError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HarnessError(
            f"could not load the hub dataset {label}: {first}. It is no local path, the datasets cache at "
            f"{cache_dir or datasets.config.HF_DATASETS_CACHE} does not have it, and the hub could not provide it "
            "(no network, or HF_HUB_OFFLINE=1). "
            "Either point dataset.path at a local copy (a save_to_disk folder, a .parquet file or folder, or "
            "an image folder root/<class>/<image>), or run once with network access to fill the cache, or set "
            "HF_HOME (or dataset.cache_dir) to a cache that has it") from None
    except Exception as e:  # noqa: BLE001 - the library's own message, without its stack
        raise HarnessError(f"could not load {label}: {type(e).__name__}: {e}") from None


# --- columns and labels --------------------------------------------------------------------------

def _describe(features: Any) -> str:
    return ", ".join(f"{k} ({type(v).__name__})" for k, v in features.items())


def _column(kind: str, wanted: str | None, features: Any, columns: list[str], path: str, feature_type: Any,
            names: tuple[str, str], exclude: str | None = None) -> str:
    """The ``kind`` (image or label) column: ``wanted``, else the first column of ``feature_type``,
    else the first of ``names``; an error listing the columns otherwise."""
    if wanted is not None:
        if wanted not in columns:
            raise HarnessError(f"{path} has no column {wanted!r} (dataset.{kind}_column); columns: "
                               f"{_describe(features)}")
        return wanted
    for col in columns:
        if col != exclude and isinstance(features[col], feature_type):
            return col
    for col in names:
        if col in columns:
            return col
    raise HarnessError(f"{path} has no {kind} column (no {feature_type.__name__} column, none named "
                       f"{names[0]} or {names[1]}); set dataset.{kind}_column to one of: {_describe(features)}")


def _label_indices(raw: list[Any], feature: Any, names: list[str] | None, classes_file: str | None,
                   path: str, column: str) -> list[int | None]:
    """Each row's class index, ``None`` where the row has none (``-1``, empty, an unknown name)."""
    lookup = class_lookup(classes_file) if classes_file else {}
    out: list[int | None] = []
    for v in raw:
        if v is None or isinstance(v, bool):
            out.append(None)
        elif isinstance(v, int | np.integer):
            out.append(int(v) if v >= 0 else None)
        elif isinstance(v, str):
            if not names:
                out.append(None)  # named later from the distinct texts
            else:
                found = lookup.get(v, lookup.get(v.lower())) if lookup else None
                out.append(found if found is not None else (names.index(v) if v in names else None))
        else:
            raise HarnessError(f"{path}: column {column!r} holds {type(v).__name__} values ({feature}); a label "
                               "column holds class indices or names (set dataset.label_column)")
    return out


def _class_indices(classes: list[str | int], names: list[str], path: str) -> set[int]:
    keep, unknown = set(), []
    for c in classes:
        if isinstance(c, int) and not isinstance(c, bool):
            if 0 <= c < len(names):
                keep.add(c)
            else:
                unknown.append(c)
        elif str(c) in names:
            keep.add(names.index(str(c)))
        elif str(c).isdigit() and int(str(c)) < len(names):
            keep.add(int(str(c)))
        else:
            unknown.append(c)
    if unknown:
        shown = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
        raise HarnessError(f"dataset.classes {unknown} name no class of {path}; classes: {shown}")
    return keep


# --- decoding ------------------------------------------------------------------------------------

def _decode(value: Any, max_pixels: int) -> tuple[np.ndarray | None, str]:
    """(the image as uint8 RGB, "") or (None, why it was skipped)."""
    from PIL import Image, UnidentifiedImageError

    if value is None:
        return None, "no image (empty cell)"
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        data, where = value.get("bytes"), value.get("path")
        if data is None and not where:
            return None, "no image (neither bytes nor a path)"
        try:
            with Image.open(io.BytesIO(data) if data is not None else Path(where)) as im:
                if im.width * im.height > max_pixels:
                    return None, (f"{im.width}x{im.height} pixels, more than max_pixels={max_pixels} "
                                  "(a decompression bomb?)")
                return to_rgb8(im), ""
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            return None, f"unreadable image: {e}"
    if isinstance(value, Image.Image):
        if value.width * value.height > max_pixels:
            return None, f"{value.width}x{value.height} pixels, more than max_pixels={max_pixels}"
        return to_rgb8(value), ""
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as e:
        return None, f"not an image array: {e}"
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or a.dtype == object:
        return None, f"not an image array: shape {a.shape}, dtype {a.dtype}"
    if a.shape[0] * a.shape[1] > max_pixels:
        return None, f"{a.shape[1]}x{a.shape[0]} pixels, more than max_pixels={max_pixels}"
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        return None, "NaN or infinite pixel values"
    a = to_uint8(a, "the image array")
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2), ""
    if a.shape[-1] == 4:
        return to_rgb8(Image.fromarray(np.ascontiguousarray(a), "RGBA")), ""  # alpha over white, as files are
    return np.ascontiguousarray(a), ""
