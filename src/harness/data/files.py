"""Images from disk: image folders and npz arrays, with class names from a text or TSV file."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from harness.types import HarnessError, ImageSet

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_class_names(path: str | Path, column: str | int = 0) -> list[str]:
    """One name per line (``.txt``) or a column of a TSV with a header (``.tsv``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise HarnessError(f"class-name file not found: {p}")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if p.suffix != ".tsv":
        return [ln.strip() for ln in lines]
    header = lines[0].split("\t")
    if isinstance(column, str):
        if column not in header:
            raise HarnessError(f"{p} has no column {column!r}; columns: {', '.join(header)}")
        column = header.index(column)
    return [ln.split("\t")[column].split(",")[0].strip() for ln in lines[1:]]


def class_lookup(path: str | Path) -> dict[str, int]:
    """Every way a class file names a class, to its index: each cell of a TSV row (e.g. the
    index, the WordNet id ``n01440764`` and each comma-separated name), or each line of a
    ``.txt``; names also lower-cased."""
    p = Path(path).expanduser()
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = [ln.split("\t") for ln in lines[1:]] if p.suffix == ".tsv" else [[ln] for ln in lines]
    out: dict[str, int] = {}
    for i, row in enumerate(rows):
        for cell in row:
            for name in {cell.strip(), *(n.strip() for n in cell.split(","))} - {""}:
                out.setdefault(name, i)
                out.setdefault(name.lower(), i)
    return out


def _require(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise HarnessError(f"{what} not found: {p}")
    return p


def image_folder(
    root: str,
    classes_file: str | None = None,
    classes_column: str | int = 0,
    label_regex: str | None = None,
    n: int | None = None,
    max_pixels: int = 89_478_485,
) -> ImageSet:
    """Images under ``root`` with labels from sub-folders or from the file names.

    Args:
        root: folder of images.
        classes_file: class names in index order (``.txt`` or ``.tsv``). Without it, with
            sub-folder labels, the sorted sub-folder names are the classes.
        classes_column: TSV column holding the names.
        label_regex: a regex whose first group names the class in the file name: its index
            (e.g. ``_(\\d+)\\.\\w+$``), or, with ``classes_file``, any name the file gives it
            (a WordNet id: ``^(n\\d{8})_`` for ``n01440764_tench.JPEG``; a class name);
            ``None``: ``root/<class>/<image>``, the folder named by the class or (with
            ``classes_file``) by its WordNet id or any other name in the file.
        n: keep only the first ``n`` images (sorted by path).
        max_pixels: an image with more pixels (width × height, read from its header before
            decoding) is skipped as a possible decompression bomb; the default is Pillow's
            own limit (``PIL.Image.MAX_IMAGE_PIXELS``), which Pillow only warns about.

    Images that cannot be decoded are skipped and listed in ``ImageSet.skipped``.
    """
    from PIL import Image, UnidentifiedImageError

    base = _require(root, "image folder")
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    names = read_class_names(classes_file, classes_column) if classes_file else None
    lookup = class_lookup(classes_file) if classes_file else {}
    if label_regex is None:
        if names is None:
            names = sorted(d.name for d in base.iterdir() if d.is_dir())
        index = {**lookup, **{c: i for i, c in enumerate(names)}}
        files = [f for f in files if f.parent != base]
    if not files:
        raise HarnessError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {base}")
    images, labels, ids, skipped = [], [], [], []
    for f in files:
        if n is not None and len(images) >= n:
            break
        rel = str(f.relative_to(base))
        if label_regex is None:
            label = index.get(f.parent.name)
            if label is None:
                skipped.append((rel, f"folder {f.parent.name!r} is not a known class"))
                continue
        else:
            m = re.search(label_regex, f.name)
            if not m:
                skipped.append((rel, f"no label in the file name (regex {label_regex!r})"))
                continue
            key = m.group(1)
            if key.isdigit():
                label = int(key)
            elif (found := lookup.get(key, lookup.get(key.lower()))) is not None:
                label = found
            else:
                skipped.append((rel, f"{key!r} names no class" + (f" of {classes_file}" if classes_file else
                                                                   " (a name needs dataset.classes_file)")))
                continue
            if names is not None and not 0 <= label < len(names):
                skipped.append((rel, f"label {label} is not a class index (the class file has {len(names)})"))
                continue
        try:
            with Image.open(f) as im:
                if im.width * im.height > max_pixels:
                    skipped.append((rel, f"{im.width}x{im.height} pixels, more than max_pixels={max_pixels} "
                                         "(a decompression bomb?)"))
                    continue
                images.append(to_rgb8(im))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, HarnessError) as e:
            skipped.append((rel, f"unreadable image: {e}"))
            continue
        labels.append(label)
        ids.append(rel)
    for rel, why in skipped:
        log.warning("skipped %s: %s", rel, why)
    if names is None:
        names = [str(i) for i in range(max(labels) + 1)] if labels else []
    return ImageSet(images=images, labels=np.array(labels, dtype=np.int64), ids=ids,
                    class_names=names, skipped=skipped)


def to_uint8(a: np.ndarray, what: str) -> np.ndarray:
    """Pixel values as uint8, never wrapped around: uint16 scaled by 255/65535; floats in [0, 1]
    scaled by 255 and floats in [0, 255] taken as they are; other integers taken as they are up to
    255 and as 16-bit values up to 65535."""
    if a.dtype == np.uint8:
        return a
    if a.size and float(a.min()) < 0:
        raise HarnessError(f"{what} has negative pixel values (min {float(a.min()):g}); expected [0, 1], [0, 255] "
                           "or unsigned 16-bit")
    hi = float(a.max()) if a.size else 0.0
    if a.dtype == np.uint16 or (np.issubdtype(a.dtype, np.integer) and 255 < hi <= 65535):
        return (a.astype(np.float64) * (255 / 65535)).round().astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        if hi <= 255:
            return a.astype(np.uint8)
        raise HarnessError(f"{what}: integer pixel values up to {hi:g}; expected 8- or 16-bit")
    if hi <= 1:
        return (a * 255).round().astype(np.uint8)
    if hi <= 255:
        return a.round().astype(np.uint8)
    raise HarnessError(f"{what}: float pixel values up to {hi:g}; expected [0, 1] or [0, 255]")


def to_rgb8(im: Any) -> np.ndarray:
    """A PIL image as 8-bit RGB ``[H, W, 3]``: turned upright by its EXIF orientation; 16-bit
    grey scaled by 255/65535 and 32-bit grey or float as :func:`to_uint8` says (Pillow's own
    ``convert("RGB")`` clips them, so a 16-bit PNG came out white); palette, CMYK, grey and
    1-bit images converted; transparency composited over white (the usual page background)."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16"):
        grey = to_uint8(np.asarray(im).astype(np.uint16), f"a {im.mode} image")
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode in ("I", "F"):
        return np.repeat(to_uint8(np.asarray(im), f"a {im.mode} image")[..., None], 3, axis=2)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return np.asarray(im.convert("RGB"))


def npz_images(
    path: str,
    classes_file: str | None = None,
    images_key: str = "images",
    labels_key: str = "labels",
    masks_key: str | None = None,
    start: int = 0,
    n: int | None = None,
) -> ImageSet:
    """Images from an ``.npz``: uint8 ``[N, 3, H, W]`` or ``[N, H, W, 3]`` and int labels.

    Args:
        path: the ``.npz`` file.
        classes_file: class names in index order.
        images_key, labels_key: array names in the file.
        masks_key: optional boolean ``[N, H, W]`` ground-truth masks.
        start, n: the slice of images to use.
    """
    p = _require(path, "npz file")
    with np.load(p) as z:
        missing = [k for k in (images_key, labels_key, masks_key) if k and k not in z.files]
        if missing:
            raise HarnessError(f"{p} has no array {missing}; arrays: {', '.join(z.files)}")
        stop = None if n is None else start + n
        imgs = z[images_key][start:stop]
        labels = z[labels_key][start:stop]
        masks = z[masks_key][start:stop] if masks_key else None
    if imgs.ndim != 4 or 3 not in (imgs.shape[1], imgs.shape[-1]):
        raise HarnessError(f"{p}:{images_key} must be [N, 3, H, W] or [N, H, W, 3], got {imgs.shape}")
    if imgs.shape[-1] != 3:
        imgs = imgs.transpose(0, 2, 3, 1)
    if np.issubdtype(imgs.dtype, np.floating) and not (finite := np.isfinite(imgs)).all():
        bad = np.argwhere(~finite)
        raise HarnessError(f"{p}:{images_key} has {len(bad)} NaN or infinite pixel values, first at "
                           f"[image, row, column, channel] {', '.join(str(list(map(int, b))) for b in bad[:3])}")
    imgs = to_uint8(imgs, f"{p}:{images_key}")
    names = read_class_names(classes_file) if classes_file else [str(i) for i in range(int(labels.max()) + 1)]
    ids = [f"{p.stem}-{start + i:06d}" for i in range(len(imgs))]
    return ImageSet(
        images=list(imgs), labels=labels, ids=ids, class_names=names,
        masks=None if masks is None else [m.astype(bool) for m in masks],
    )
