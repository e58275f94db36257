"""``python -m harness.sensitivity``: the XAI-sensitivity statistic over a finished sweep,
logged to MLflow as a summary run (see :mod:`harness.text.sensitivity`)."""

from __future__ import annotations

import sys

import json
import logging
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig

from harness import CONF_DIR
from harness.types import HarnessError, exit_cleanly

log = logging.getLogger(__name__)


def load_answers(client, experiment_id: str, tmp: Path):
    """Every answer of the experiment's finished runs, with the run's option choices."""
    import pandas as pd

    rows = []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'")
    for run in runs:
        tags = run.data.tags
        if tags.get("kind") == "summary" or "choice.xai" not in tags:
            continue
        try:
            path = client.download_artifacts(run.info.run_id, "answers.jsonl", str(tmp / run.info.run_id))
        except Exception:  # noqa: BLE001 - a run without a language stage
            continue
        for line in Path(path).read_text().splitlines():
            a = json.loads(line)
            rows.append({"run_id": run.info.run_id, "image_id": a["image_id"], "text": a["text"],
                         "method": tags["choice.xai"], "mllm": f"{tags.get('choice.mllm')}:{a['model']}",
                         "prompt": tags.get("choice.prompt"),
                         "render": tags.get("choice.render"), "model": tags.get("choice.model"),
                         "dataset": tags.get("choice.dataset")})
    return pd.DataFrame(rows)


def run(cfg: DictConfig) -> dict[str, float]:
    from harness.components import build
    from harness.text.consistency import Embedder
    from harness.text.sensitivity import plot, sensitivity

    tracker = build(cfg.tracking)
    client = tracker.client()
    exp = client.get_experiment_by_name(cfg.source_experiment)
    if exp is None:
        raise HarnessError(f"source_experiment={cfg.source_experiment!r} does not exist in {cfg.tracking.uri}")
    with tempfile.TemporaryDirectory() as tmp:
        answers = load_answers(client, exp.experiment_id, Path(tmp))
    if answers.empty:
        raise HarnessError(f"no finished run of {cfg.source_experiment!r} has answers (answers.jsonl)")
    embedder = Embedder(cfg.embedding.model, cfg.embedding.fallback, cfg.device)
    vectors = embedder(answers["text"].tolist())
    result = sensitivity(answers, vectors, list(cfg.group_by), "method", int(cfg.n_permutations), int(cfg.seed))
    metrics = result.metrics()
    verdict = ("sensitive" if result.p_value < float(cfg.alpha) else "not measurably sensitive")
    with tracker.start_run(cfg.run_name, tags={"kind": "summary", "source_experiment": cfg.source_experiment,
                                               "embedding": embedder.name, "verdict": verdict}) as rec:
        rec.params({"n_permutations": cfg.n_permutations, "alpha": cfg.alpha, "group_by": ",".join(cfg.group_by),
                    "embedding.model": cfg.embedding.model, "embedding.used": embedder.name, "seed": cfg.seed})
        rec.metrics(metrics)
        rec.table(result.groups, "sensitivity_groups.json")
        with rec.folder() as out:
            plot(result, out / "sensitivity.png")
            (out / "sensitivity.json").write_text(json.dumps({**metrics, "verdict": verdict}, indent=1))
    print(f"XAI sensitivity over {result.n_groups} groups ({result.n_answers} answers, {embedder.name}): "
          f"between - within = {result.statistic:.4f}, p = {result.p_value:.4g}, Cohen's d = {result.effect_size:.3g}"
          f" -> the answers are {verdict} to the XAI method (alpha = {cfg.alpha})")
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sensitivity")
def main(cfg: DictConfig) -> None:
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the entry point's choice: one bar per run is noise
    exit_cleanly("harness.sensitivity", run, cfg)


if __name__ == "__main__":
    from harness.validate import open_keys

    sys.argv[1:] = open_keys(sys.argv[1:])  # model.kwargs.img_size=32 without a `+`
    main()
