"""Jobs in a child process, so a method that patches models cannot poison the next job.

The explainers' own patches are scoped (context managers, removed on exit, tested), but a
sweep runs many jobs in one process with the basic launcher, and a third-party method or a
crash mid-patch could leave something behind. ``isolation: auto`` (the default) runs a job in a
fresh ``spawn`` child process when its explainer declares ``patches_model`` without
``patches_scoped`` (the project's LRP family scopes its patches and is tested for leftovers, so
it runs in the warm launcher process); ``always`` isolates every job (costs the interpreter and
import start-up, a few seconds); ``never`` runs in the launcher's process.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.types import HarnessError

MODES = ("auto", "always", "never")


def wants_isolation(cfg: DictConfig) -> bool:
    mode = cfg.get("isolation", "auto")
    if mode not in MODES:
        raise HarnessError(f"isolation={mode!r} is not valid; valid: {', '.join(MODES)}")
    if mode != "auto":
        return mode == "always"
    from hydra.utils import get_class

    try:
        cls = get_class(cfg.xai._target_)
        return bool(cls.patches_model and not cls.patches_scoped)
    except Exception:  # noqa: BLE001 - an unknown class fails later with its own message
        return False


def _child(cfg: dict, context: dict[str, Any], queue: Any) -> None:
    from harness.pipeline import run

    try:
        queue.put(("ok", run(OmegaConf.create(cfg), context)))
    except HarnessError as e:
        queue.put(("harness", str(e)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        queue.put(("error", traceback.format_exc()))


def run_isolated(cfg: DictConfig, context: dict[str, Any]) -> dict[str, float]:
    """:func:`harness.pipeline.run` in a spawned child; its errors come back as errors here."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(OmegaConf.to_container(cfg, resolve=True), context, queue))
    proc.start()
    result = None
    while result is None:
        try:
            result = queue.get(timeout=1.0)
        except Exception:  # noqa: BLE001 - queue.Empty: check the child is still alive
            if not proc.is_alive():
                break
    proc.join()
    if result is None:
        raise HarnessError(f"the job's process died (exit code {proc.exitcode}) before it finished; "
                           "its run stays RUNNING and a resumed sweep runs it again")
    kind, value = result
    if kind == "harness":
        raise HarnessError(value)
    if kind == "error":
        raise RuntimeError(f"the job failed in its child process:\n{value}")
    return value
