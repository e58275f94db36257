"""Hydra's basic sweeper, composing each job once and never launching a finished one.

Hydra's ``BasicSweeper`` composes every job of a batch to validate it, then the launcher
composes every job again to run it. This sweeper validates one job per swept value instead
(the first job that carries each ``key=value`` of the batch): a bad option or value still stops
the sweep before any job runs, with Hydra's own message, and whatever only a combination of
values breaks is reported when the launcher composes that job.

Resume: when the store already holds finished configs (``finished_configs.json``, written as the
sweep starts, see :mod:`harness.resume`) and ``resume`` is on, each job's config is composed
here (or recalled: a job composed before from the same files is not composed again,
:class:`harness.resume.JobConfigs`) and those whose resolved config finished are left out of the batch: the launcher never starts them
(no job folder, no logging set-up, no process). They are listed in ``skipped_jobs.json`` for the
sweep summary. A job this check cannot place (its config reads the job's own runtime values)
is launched and finds its finished run itself. Everything else (grids,
``hydra.sweeper.params``, batching) is the basic sweeper's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

SKIPPED = "skipped_jobs.json"


def covering_jobs(batch: Sequence[Sequence[str]]) -> list[Sequence[str]]:
    """The jobs of ``batch``, in order, that carry a ``key=value`` no earlier kept job carries."""
    seen: set[str] = set()
    keep = []
    for overrides in batch:
        if new := set(overrides) - seen:
            keep.append(overrides)
            seen |= new
    return keep


class HarnessSweeper(BasicSweeper):
    """``BasicSweeper`` with validation by swept value and resume before launch (see the
    module docstring)."""

    def sweep(self, arguments: list[str]) -> Any:
        """The basic sweep, with credentials kept out of the launchers' log lines and the
        sweep's ``multirun.yaml`` (:mod:`harness.secrets`)."""
        from harness.secrets import redacted_logs

        with redacted_logs():
            return super().sweep(arguments)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Compose the covering jobs (Hydra's check; a job composed before with the same files
        is recalled, :class:`harness.resume.JobConfigs`) and check their values
        (:func:`harness.validate.check`): a mistake stops the sweep before any job, in one line."""
        from hydra.core.hydra_config import HydraConfig

        from harness import CONF_DIR
        from harness.types import HarnessError
        from harness.validate import check

        hc = HydraConfig.instance()
        parent = hc.cfg
        try:
            for overrides in covering_jobs(batch):
                cfg = self.job_configs().task_config(overrides)  # the job's ${hydra:...} values resolve as in the job
                choices = {g: str(o) for g, o in HydraConfig.get().runtime.choices.items() if o is not None}
                try:
                    check(cfg, list(overrides), choices, CONF_DIR)
                except HarnessError as e:
                    print(f"harness: error: {e}", file=sys.stderr)
                    raise SystemExit(1) from None
        finally:
            hc.cfg = parent

    def job_configs(self) -> Any:
        """The sweep's :class:`harness.resume.JobConfigs` (made once)."""
        if getattr(self, "_job_configs", None) is None:
            from harness.resume import JobConfigs

            assert self.config is not None and self.hydra_context is not None
            self._job_configs = JobConfigs(self.hydra_context.config_loader, self.config)
        return self._job_configs

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        from harness.secrets import override_secrets, redact_files

        batch = super().get_job_batch()
        assert self.config is not None and self.hydra_context is not None
        sweep = Path(self.config.hydra.sweep.dir)
        redact_files(override_secrets(self.config.hydra.overrides.task), sweep / "multirun.yaml")
        try:
            index = json.loads((sweep / "finished_configs.json").read_text())
        except (OSError, ValueError):
            return batch
        if not index:
            return batch
        from hydra.core.hydra_config import HydraConfig

        from harness.resume import config_hash

        keep, skipped = [], []
        hc = HydraConfig.instance()
        parent = hc.cfg
        try:
            for overrides in batch:
                cfg = self.job_configs().task_config(overrides)
                if not cfg.get("resume", False):
                    keep.append(overrides)
                    continue
                try:
                    run_id = index.get(config_hash(cfg))
                except Exception:  # noqa: BLE001 - an interpolation only the job can resolve: let it decide
                    run_id = None
                (skipped.append({"overrides": list(overrides), "finished_run": run_id}) if run_id
                 else keep.append(overrides))
        finally:
            hc.cfg = parent
        if skipped:
            path = sweep / SKIPPED
            before = json.loads(path.read_text()) if path.exists() else []
            path.write_text(json.dumps(before + skipped, indent=1))
            count = sweep / "sweep_jobs.json"  # the launched jobs announce themselves as "job k of n"
            if count.exists() and (n := json.loads(count.read_text()).get("jobs")):
                count.write_text(json.dumps({"jobs": n - len(skipped)}))
            print(f"sweep: {len(skipped)} of {len(batch)} jobs already finished: skipped "
                  "(resume=false runs them again)", file=sys.stderr)
        return keep
