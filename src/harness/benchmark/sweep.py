"""``python -m harness.benchmark.sweep``: run one sweep twice into a fresh store and cache, and
print what each run computed per stage against what a sweep must compute at least, the
wall-time ratio of the second run to the first (goal: at most 0.05), and the fixed cost of a
job: alone in a fresh process and per job inside the sweep's process, the re-run against a bare
``python -c "import torch, mlflow"`` (goal: at most 2), and ``uv run`` against the
environment's python, both importing torch (goal: at most 1.2).

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
from harness.tracking.mlflow_tracker import run_summary

GOAL = 0.05


def computed(runs: list[Any]) -> dict[str, float]:
    """Items computed by a sweep's runs, per stage (cache misses × images; answers not cached)."""
    out = {"predictions": 0.0, "attributions": 0.0, "answers": 0.0}
    for r in runs:
        m = run_summary(r)
        out["predictions"] += m.get("cache_misses_predictions", 0) * m.get("n_images", 0)
        out["attributions"] += m.get("cache_misses_attributions", 0) * m.get("n_images", 0)
        out["answers"] += m.get("n_answers", 0) - m.get("answer_cache_hits", 0)
    return out


def needed(runs: list[Any]) -> tuple[dict[str, float], str]:
    """The least each stage must compute for the sweep these runs form, and the formula."""
    tags = [r.data.tags for r in runs]
    count = {g: len({t.get(f"choice.{g}") for t in tags}) for g in ("model", "xai", "mllm", "prompt")}
    n = max(run_summary(r).get("n_images", 0) for r in runs)
    s = max(int(r.data.params.get("mllm.decoding.num_samples", 1)) for r in runs)
    m, x, ll, p = count["model"], count["xai"], count["mllm"], count["prompt"]
    asked = any("n_answers" in run_summary(r) for r in runs)
    return ({"predictions": m * n, "attributions": m * x * n, "answers": m * x * ll * p * n * s * asked},
            f"M={m} X={x} L={ll} P={p} N={n:g} S={s}")


def timed(cmd: list[str], **kw: Any) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds and CPU seconds (user + system of the child and its children) of a command."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), p


def fastest(cmd: list[str], repeats: int) -> tuple[float, float]:
    """The fastest of ``repeats`` runs of ``cmd``: (wall, CPU seconds)."""
    runs = []
    for _ in range(repeats):
        wall, cpu, p = timed(cmd)
        if p.returncode != 0:
            raise HarnessError(f"{' '.join(cmd)} failed: {p.stderr[-1000:]}")
        runs.append((wall, cpu))
    return min(runs)


def stage_seconds(run: Any) -> float:
    """The science of a job: its stages' seconds, logging the artifacts left out (a fixed cost)."""
    return sum(v for k, v in run_summary(run).items() if k.startswith("seconds_") and k != "seconds_artifacts")


def fixed_costs(runs: list[Any]) -> list[float]:
    """Per job inside one sweep process: the time between two consecutive jobs' ends minus the
    later job's stage seconds (composing, building, logging, everything but the science)."""
    runs = sorted(runs, key=lambda r: r.info.end_time)
    return [(b.info.end_time - a.info.end_time) / 1000 - stage_seconds(b) for a, b in zip(runs, runs[1:])]


def run(cfg: DictConfig) -> dict[str, Any]:
    import shutil
    import statistics

    from mlflow import MlflowClient

    root = Path(cfg.output_dir) if cfg.output_dir else Path(tempfile.mkdtemp(prefix="harness-sweep-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    store = [f"tracking.uri=sqlite:///{root}/m.db", f"tracking.artifact_location={root}/artifacts",
             f"cache.dir={root}/stages", f"language.cache_dir={root}/answers", "experiment_name=sweep-benchmark"]
    walls, cpus, per_run = [], [], []
    client = MlflowClient(f"sqlite:///{root}/m.db")
    seen: set[str] = set()
    for i in (1, 2):
        wall, cpu, p = timed([sys.executable, "-m", "harness", "-m", *map(str, cfg.sweep), *store,
                              f"hydra.sweep.dir={root}/sweep{i}"])
        walls.append(wall)
        cpus.append(cpu)
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
    print(f"jobs: run 1 {len(per_run[0])} runs ({len(per_run[0]) / walls[0] * 60:.1f} jobs per minute), "
          f"run 2 {len(per_run[1])} new runs")
    print(f"wall: run 1 {walls[0]:.1f} s, run 2 {walls[1]:.1f} s, ratio {ratio:.3f} (goal <= {GOAL})")
    out = {"needed": need, "run1": first, "run2": second, "walls": walls, "cpus": cpus, "ratio": ratio}
    if not cfg.fixed_cost:
        return out

    # The fixed cost of a job: alone in a fresh process, and per job inside the sweep's process.
    one = next(iter(per_run[0]))
    mine = {o.split("=", 1)[0] for o in store}
    job = [o for o in one.data.tags["hydra_overrides"].split() if o.split("=", 1)[0] not in mine]
    wall1, cpu1, p = timed([sys.executable, "-m", "harness", *job, *[s.replace("m.db", "single.db") for s in store],
                            f"hydra.run.dir={root}/single", "resume=false"])
    if p.returncode != 0:
        raise HarnessError(f"the single job failed (exit {p.returncode}): {p.stderr[-2000:]}")
    alone = MlflowClient(f"sqlite:///{root}/single.db")
    single = alone.search_runs([alone.get_experiment_by_name("sweep-benchmark").experiment_id])[0]
    in_sweep = fixed_costs(per_run[0])
    bare_wall, bare_cpu = fastest([sys.executable, "-c", "import torch, mlflow"], int(cfg.repeats))
    venv_wall, venv_cpu = fastest([sys.executable, "-c", "import torch"], int(cfg.repeats))
    uv = shutil.which("uv")
    uv_run = fastest([uv, "run", "--project", str(Path(__file__).resolve().parents[3]), "python", "-c", "import torch"],
                     int(cfg.repeats)) if uv else None
    rows = [
        ("fixed cost of a job, fresh process (wall - stage s)", f"{wall1 - stage_seconds(single):.2f} s",
         f"{wall1:.2f} s wall, {cpu1:.2f} CPU-s, stages {stage_seconds(single):.2f} s"),
        ("fixed cost per job inside the sweep (median)", f"{statistics.median(in_sweep):.2f} s" if in_sweep else "n/a",
         f"{len(in_sweep)} jobs, min {min(in_sweep, default=0):.2f}, max {max(in_sweep, default=0):.2f} s"),
        ("re-run of the finished sweep / first run", f"{ratio:.3f}",
         f"wall {walls[1]:.1f} / {walls[0]:.1f} s; CPU {cpus[1]:.1f} / {cpus[0]:.1f} s = {cpus[1] / cpus[0]:.3f}; goal <= {GOAL}"),
        ('re-run / python -c "import torch, mlflow"', f"{walls[1] / bare_wall:.2f}",
         f"wall {walls[1]:.1f} / {bare_wall:.1f} s; CPU {cpus[1]:.1f} / {bare_cpu:.1f} = {cpus[1] / bare_cpu:.2f}; goal <= 2"),
        ('uv run python -c "import torch" / venv python', f"{uv_run[0] / venv_wall:.2f}" if uv_run else "n/a (no uv)",
         (f"wall {uv_run[0]:.2f} / {venv_wall:.2f} s; CPU {uv_run[1]:.2f} / {venv_cpu:.2f} = {uv_run[1] / venv_cpu:.2f}; "
          "goal <= 1.2") if uv_run else ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'fixed cost':<{width}}  {'value':>8}  measured")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>8}  {note}")
    out.update(fixed_fresh=wall1 - stage_seconds(single), fixed_in_sweep=in_sweep, bare_import=bare_wall,
               uv_run=uv_run[0] if uv_run else None, venv_import=venv_wall)
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="benchmark_sweep")
def main(cfg: DictConfig) -> None:
    exit_cleanly("harness.benchmark.sweep", run, cfg)


if __name__ == "__main__":
    main()
