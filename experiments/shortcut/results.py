"""Print the shortcut study's results table (experiments/shortcut/README.md) from the MLflow store.

    uv run python experiments/shortcut/results.py [--uri sqlite:///mlruns/mlflow.db] [--experiment shortcut]

Logged metrics are read as they are (mean ± sem over the images). Three columns are computed here from
each run's artifacts: the median relevance mass accuracy (per_image.json), the share of maps whose
maximum lies on the mark (attributions.npz), and the share of answers whose "strongest evidence" sentence
names the upper left (answers.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from harness.tracking.mlflow_tracker import run_summary

ROOT = Path(__file__).resolve().parents[2]
BOX = (0, 0, 3, 3)


def table(path: str) -> dict[str, list]:
    t = json.loads(Path(path).read_text())
    return {c: [row[i] for row in t["data"]] for i, c in enumerate(t["columns"])}


def main() -> None:
    from mlflow.tracking import MlflowClient

    ap = argparse.ArgumentParser()
    ap.add_argument("--uri", default=f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}")
    ap.add_argument("--experiment", default="shortcut")
    args = ap.parse_args()
    client = MlflowClient(tracking_uri=args.uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {args.uri}; "
                         "run: python -m harness -m experiment=shortcut")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              max_results=1000)
    runs = [r for r in runs if "choice.xai" in r.data.tags and "kind" not in r.data.tags]  # no report runs
    runs.sort(key=lambda r: (r.data.params["model.train_data.spurious_prob"],
                             -float(r.data.params["dataset.spurious_prob"]), r.data.tags.get("choice.xai", "")))

    def fmt(m: dict, k: str, digits: int = 3) -> str:
        return "–" if k not in m else f"{m[k]:.{digits}f} ± {m.get(k + '_sem', float('nan')):.{digits}f}"

    print("| model (train mark) | test mark | xai | accuracy | region_mass | region_mass_ratio "
          "| relevance_mass_accuracy (median) | pointing_game | points_to_box | peak on mark "
          "| strongest in upper left |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    top, left, bottom, right = BOX
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            p, m, rid = r.data.params, run_summary(r), r.info.run_id
            d = str(Path(tmp) / rid)
            rma = np.asarray(table(client.download_artifacts(rid, "per_image.json", d))["relevance_mass_accuracy"],
                             dtype=float)
            maps = np.load(client.download_artifacts(rid, "attributions.npz", d))["attributions"]
            peaks = [np.unravel_index(np.argmax(a), a.shape) for a in maps]
            on_mark = np.mean([top <= i < bottom and left <= j < right for i, j in peaks])
            answers = table(client.download_artifacts(rid, "answers.json", d))["text"]
            strongest = np.mean(["strongest evidence is in the upper left" in t for t in answers])
            train = p["model.train_data.spurious_prob"]
            model = "shortcut" if float(train) > 0 else "clean"
            marked = "yes" if float(p["dataset.spurious_prob"]) >= 0.5 else "no"
            print(f"| {model} ({train}) | {marked} | {r.data.tags.get('choice.xai')} | {m['accuracy']:.3f} "
                  f"| {fmt(m, 'region_mass')} | {fmt(m, 'region_mass_ratio', 1)} "
                  f"| {fmt(m, 'relevance_mass_accuracy')} ({np.nanmedian(rma):.3f}) | {fmt(m, 'pointing_game')} "
                  f"| {fmt(m, 'points_to_box')} | {on_mark:.3f} | {strongest:.3f} |")

if __name__ == "__main__":
    main()
