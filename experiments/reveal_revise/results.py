"""Print the reveal-and-revise tables (experiments/reveal_revise/README.md) from the MLflow store.

    uv run python experiments/reveal_revise/results.py [--uri sqlite:///mlruns/mlflow.db] [--experiment reveal_revise]

Table 1 is laid out as in Reveal to Revise (Pahde et al. 2023): per correction method and iteration, the artifacts
corrected so far, the accuracy on the clean test set, and for each artifact its relevance share (``artifact_mass``:
the share of the decision's positive LRP relevance on the artifact's pixels, mean ± sem over the images) and the
accuracy on the test set poisoned with it. Table 2 is what the reveal finds on the reference images after each
iteration: SpRAy's cluster purity on the heatmaps and on the concept relevances, and the atlas's top-10 concepts
lying mostly on each artifact. Metrics are read as logged; nothing is computed here but their layout.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from harness.tracking.mlflow_tracker import run_summary

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ("corner", "bandaid", "watermark")


def runs_by_cell(client, experiment: str) -> dict[tuple[str, int, str], dict[str, float]]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r}; run: python -m harness -m experiment=reveal_revise")
    cells = {}
    for r in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=5000):
        p = r.data.params
        if "test_set" not in p or "revise._target_" not in p:
            continue
        method = p["revise._target_"].rsplit(".", 1)[-1]
        iteration = len(ast.literal_eval(p.get("revise.artifacts", "[]")))
        cells[(method, iteration, p["test_set"])] = run_summary(r)
    return cells


def main() -> None:
    from mlflow.tracking import MlflowClient

    ap = argparse.ArgumentParser()
    ap.add_argument("--uri", default=f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}")
    ap.add_argument("--experiment", default="reveal_revise")
    args = ap.parse_args()
    cells = runs_by_cell(MlflowClient(tracking_uri=args.uri), args.experiment)
    rows = sorted({(m, i) for m, i, _ in cells}, key=lambda r: (r[1] > 0, r[0], r[1]))
    rows = [r for r in rows if r[1] > 0 or r == min((x for x in rows if x[1] == 0), default=r)]  # iteration 0 once

    def get(method: str, it: int, test: str, key: str, digits: int = 3, sem: bool = False) -> str:
        m = cells.get((method, it, test))
        if m is None or key not in m:
            return "–"
        return f"{m[key]:.{digits}f}" + (f" ± {m[key + '_sem']:.{digits}f}" if sem and key + "_sem" in m else "")

    head = " | ".join(f"{a}: relevance | {a}: acc. poisoned" for a in ARTIFACTS)
    print(f"| method | iteration | corrected | acc. clean | {head} |")
    print("|---" * (4 + 2 * len(ARTIFACTS)) + "|")
    for method, it in rows:
        name = "none" if it == 0 else method
        fixed = ", ".join(ARTIFACTS[:it]) or "–"
        cols = " | ".join(f"{get(method, it, a, 'artifact_mass', sem=True)} | {get(method, it, a, 'accuracy')}"
                          for a in ARTIFACTS)
        print(f"| {name} | {it} | {fixed} | {get(method, it, 'clean', 'accuracy')} | {cols} |")
    print()
    head = " | ".join(f"{a}: SpRAy maps | {a}: SpRAy concepts | {a}: atlas" for a in ARTIFACTS)
    print(f"| method | iteration | {head} |")
    print("|---" * (2 + 3 * len(ARTIFACTS)) + "|")
    for method, it in rows:
        cols = []
        for a in ARTIFACTS:
            for space in ("maps", "concepts"):
                cols.append(f"{get(method, it, 'reference', f'spray_{space}_precision_{a}', 2)} / "
                            f"{get(method, it, 'reference', f'spray_{space}_recall_{a}', 2)}")
            cols.append(get(method, it, "reference", f"concepts_in_{a}", 0))
        print(f"| {'none' if it == 0 else method} | {it} | {' | '.join(cols)} |")


if __name__ == "__main__":
    main()
