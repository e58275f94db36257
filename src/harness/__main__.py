"""``python -m harness``: the Hydra entry point; the job itself is :func:`harness.pipeline.run`."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from harness import CONF_DIR
from harness.types import HarnessError


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One job; returns the score named by ``optimize`` (for ``hydra/sweeper=optuna``), else None."""
    from hydra.core.hydra_config import HydraConfig

    from harness.validate import check

    hc = HydraConfig.get()
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    try:  # before any heavy import: a bad value is one line, and no run is recorded
        check(cfg, list(hc.overrides.task), {g: str(o) for g, o in hc.runtime.choices.items() if o is not None},
              CONF_DIR)
    except HarnessError as e:
        print(f"harness: error: {e}", file=sys.stderr)
        if multirun:
            return None  # the sweep's summary names the job (no run) and the sweep exits 1
        sys.exit(1)
    optimize = cfg.get("optimize")
    if multirun and cfg.get("resume", False) and not optimize:  # before any heavy import (harness.resume)
        from harness.resume import finished_in_sweep, mark_skipped, remember_job

        remember_job(cfg, hc)  # a resumed sweep places this job without composing it
        if (run_id := finished_in_sweep(cfg, hc.sweep.dir)) is not None:
            print(f"harness: already finished as run {run_id}: skipped", file=sys.stderr)
            return mark_skipped(run_id, str(hc.runtime.output_dir))

    from harness.isolation import run_isolated, wants_isolation
    from harness.pipeline import hydra_context, run
    from harness.secrets import redact, redact_files, redacted_config

    cfg, found = redacted_config(cfg)  # credentials out of the config, its params and Hydra's files
    if found:
        hydra_dir = Path(hc.runtime.output_dir) / ".hydra"
        redact_files(found.values(), *(hydra_dir / f for f in ("config.yaml", "hydra.yaml", "overrides.yaml")),
                     *([Path(hc.sweep.dir) / "multirun.yaml"] if multirun else []))
    try:
        context = redact(hydra_context(), found.values())
        summary = run_isolated(cfg, context) if wants_isolation(cfg) else run(cfg, context)
        if optimize:
            if optimize not in summary:
                scores = ", ".join(k for k in summary if not k.endswith(("_sem", "_ci95_low", "_ci95_high")))
                raise HarnessError(f"optimize={optimize!r} is not a score of this job; its scores: {scores}")
            return float(summary[optimize])
    except HarnessError as e:
        print(f"harness: error: {e}", file=sys.stderr)  # the run itself records it as FAILED
        if not multirun:
            sys.exit(1)  # single run: a clean message and a non-zero exit, no traceback
    except Exception:  # a crashing job in a sweep: recorded as FAILED, the sweep goes on
        if not multirun:
            raise
        import traceback

        print(f"harness: job failed:\n{traceback.format_exc()}", file=sys.stderr)
    return float("nan") if optimize else None  # a failed trial, for an optimising sweeper


if __name__ == "__main__":
    from harness.validate import first_job_problem, open_keys, unknown_option

    sys.argv[1:] = argv = open_keys(sys.argv[1:])
    if problem := (unknown_option(argv, CONF_DIR, CONF_DIR.parent / "experiments")
                   or first_job_problem(argv, CONF_DIR)):
        print(f"harness: error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
