"""The artifact layout of a run: what a finished job leaves in MLflow besides its metrics.

``per_image.json`` (table: ids, labels, predictions, every per-image score), ``skipped.tsv``,
``metric_info.json``, ``metric_errors.tsv``, ``attributions.npz`` (maps, inputs as uint8, ids,
labels, predictions, targets, class names), ``curves.npz`` (each curve, ``<metric>_x`` its x
values and ``<metric>_y`` what it measures) and ``curves.png``, and one overlay
PNG per image under ``overlays/`` (at most ``max_overlays``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from harness.types import ImageSet, MetricOutput


def safe_name(image_id: str) -> str:
    """An image id as a file-name part: letters, digits, ``-_.`` kept, anything else (path
    separators included) ``_``, and a name of dots alone (``..``) made underscores, so no id
    can name a path outside the folder it is written to."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in image_id)
    return "_" * len(name) if set(name) <= {"."} else name


def log_artifacts(rec: Any, data: ImageSet, x: torch.Tensor, maps: np.ndarray, labels: torch.Tensor,
                  preds: torch.Tensor, targets: torch.Tensor, per_image: dict[str, np.ndarray],
                  results: dict[str, MetricOutput], info: dict[str, dict[str, Any]],
                  title: str, max_overlays: int | None, private: bool = False) -> None:
    import pandas as pd

    from harness.render.curves import plot_curves
    from harness.render.overlay import overlay

    names = data.class_names
    name_of = lambda i: names[i] if 0 <= i < len(names) else str(i)  # noqa: E731
    table = pd.DataFrame({
        "image_id": data.ids,
        "label": labels.numpy(),
        "label_name": [name_of(int(i)) for i in labels],
        "prediction": preds.numpy(),
        "prediction_name": [name_of(int(i)) for i in preds],
        "target": targets.numpy(),
        "correct": (preds == labels).numpy(),
        **per_image,
    })
    rec.table(table, "per_image.json")
    if data.skipped:
        rec.text("\n".join(f"{i}\t{why}" for i, why in data.skipped), "skipped.tsv")
    if info:
        rec.text(json.dumps(info, indent=1), "metric_info.json")
    if errors := [(data.ids[i], name, why) for name, r in results.items() for i, why in r.errors]:
        rec.text("image_id\tmetric\treason\n" + "\n".join("\t".join(e) for e in errors), "metric_errors.tsv")
    with rec.folder() as tmp:
        np.savez_compressed(tmp / "attributions.npz", attributions=maps, image_ids=np.array(data.ids),
                            labels=labels.numpy(), predictions=preds.numpy(), targets=targets.numpy(),
                            class_names=np.array(names),
                            **({} if private else {"inputs": (x.numpy().transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)}))
        curves = {k: v for r in results.values() for k, v in r.curves.items()}
        curves.update({f"{name}_x": r.curve_x for name, r in results.items() if r.curve_x is not None})
        curves.update({f"{name}_y": np.array(r.curve_y) for name, r in results.items() if r.curve_y})  # axis label
        if curves:
            np.savez_compressed(tmp / "curves.npz", **curves)
            plot_curves(results, tmp / "curves.png", title=title)
    limit = 0 if private else len(data) if max_overlays is None else min(len(data), int(max_overlays))
    if limit:
        with rec.folder("overlays") as tmp:
            for i in range(limit):
                overlay(x[i].numpy(), maps[i]).save(tmp / f"{i:05d}_{safe_name(data.ids[i])}.png")
