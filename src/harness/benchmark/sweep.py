"""``python -m harness.benchmark.sweep``: run one sweep twice into a fresh store and cache, and
print what each run computed per stage against what a sweep must compute at least, and the
wall-time ratio of the second run to the first (goal: at most 0.05).

For M models × X methods × L MLLMs × P prompts over N images (S samples per answer) a sweep
needs M·N predictions, M·X·N attributions and M·X·L·P·N·S answers; everything else is reused
from the stage cache. The second, identical run must compute nothing: its finished jobs are
skipped (resume), so it only pays for starting Hydra and asking the store.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from harness import CONF_DIR
from harness.types import HarnessError, exit_cleanly

GOAL = 0.05


def computed(runs: list[Any]) -> dict[str, float]:
    """Items computed by a sweep's runs, per stage (cache misses × images; answers not cached)."""
    out = {"predictions": 0.0, "attributions": 0.0, "answers": 0.0}
    for r in runs:
        m = r.data.metrics
        out["predictions"] += m.get("cache_misses_predictions", 0) * m.get("n_images", 0)
        out["attributions"] += m.get("cache_misses_attributions", 0) * m.get("n_images", 0)
        out["answers"] += m.get("n_answers", 0) - m.get("answer_cache_hits", 0)
    return out


def needed(runs: list[Any]) -> tuple[dict[str, float], str]:
    """The least each stage must compute for the sweep these runs form, and the formula."""
    tags = [r.data.tags for r in runs]
    count = {g: len({t.get(f"choice.{g}") for t in tags}) for g in ("model", "xai", "mllm", "prompt")}
    n = max(r.data.metrics.get("n_images", 0) for r in runs)
    s = max(int(r.data.params.get("mllm.decoding.num_samples", 1)) for r in runs)
    m, x, ll, p = count["model"], count["xai"], count["mllm"], count["prompt"]
    return ({"predictions": m * n, "attributions": m * x * n, "answers": m * x * ll * p * n * s},
            f"M={m} X={x} L={ll} P={p} N={n:g} S={s}")


def run(cfg: DictConfig) -> dict[str, Any]:
    from mlflow import MlflowClient

    root = Path(cfg.output_dir) if cfg.output_dir else Path(tempfile.mkdtemp(prefix="harness-sweep-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    store = [f"tracking.uri=sqlite:///{root}/m.db", f"tracking.artifact_location={root}/artifacts",
             f"cache.dir={root}/stages", f"language.cache_dir={root}/answers", "experiment_name=sweep-benchmark"]
    walls, per_run = [], []
    client = MlflowClient(f"sqlite:///{root}/m.db")
    seen: set[str] = set()
    for i in (1, 2):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "harness", "-m", *map(str, cfg.sweep), *store,
                            f"hydra.sweep.dir={root}/sweep{i}"], capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if p.returncode != 0:
            raise HarnessError(f"sweep {i} failed (exit {p.returncode}): {p.stderr[-2000:]}")
        exp = client.get_experiment_by_name("sweep-benchmark")
        runs = client.search_runs([exp.experiment_id], max_results=50000)
        per_run.append([r for r in runs if r.info.run_id not in seen])
        seen |= {r.info.run_id for r in runs}
    need, formula = needed(per_run[0])
    first, second = computed(per_run[0]), computed(per_run[1])
    ratio = walls[1] / walls[0]
    print(f"sweep: {' '.join(map(str, cfg.sweep))}  ({formula}; store and caches in {root})")
    print(f"{'stage':<14}{'needed':>10}{'run 1':>10}{'run 2':>10}")
    for stage in need:
        print(f"{stage:<14}{need[stage]:>10g}{first[stage]:>10g}{second[stage]:>10g}")
    print(f"jobs: run 1 {len(per_run[0])} runs, run 2 {len(per_run[1])} new runs")
    print(f"wall: run 1 {walls[0]:.1f} s, run 2 {walls[1]:.1f} s, ratio {ratio:.3f} (goal <= {GOAL})")
    return {"needed": need, "run1": first, "run2": second, "walls": walls, "ratio": ratio}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="benchmark_sweep")
def main(cfg: DictConfig) -> None:
    exit_cleanly("harness.benchmark.sweep", run, cfg)


if __name__ == "__main__":
    main()
