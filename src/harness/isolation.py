"""Jobs in a child process, so a method that patches models cannot poison the next job.

The explainers' own patches are scoped (context managers, removed on exit, tested), but a
sweep runs many jobs in one process with the basic launcher, and a third-party method or a
crash mid-patch could leave something behind. ``isolation: auto`` (the default) runs a job in a
fresh child process when its explainer declares ``patches_model`` without ``patches_scoped``
(the project's LRP family scopes its patches and is tested for leftovers, so it runs in the
warm launcher process); ``always`` isolates every job (costs the interpreter and import
start-up, a few seconds); ``never`` runs in the launcher's process.

The child is a plain ``python -m harness.isolation`` subprocess, not a ``multiprocessing``
one: inside a joblib (loky) worker, ``multiprocessing``'s spawn hands its children the
worker's own start method, which they cannot find ("cannot find context for 'loky'"). The job's
config goes to the child and its result comes back as JSON files in a temporary folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
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


def run_isolated(cfg: DictConfig, context: dict[str, Any]) -> dict[str, float]:
    """:func:`harness.pipeline.run` in a child process; its errors come back as errors here."""
    from harness.ownership import temp_name

    with tempfile.TemporaryDirectory(prefix=temp_name("harness-job")) as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"cfg": OmegaConf.to_container(cfg, resolve=True), "context": context}))
        code = subprocess.run([sys.executable, "-m", "harness.isolation", str(job), str(result)]).returncode
        try:
            kind, value = json.loads(result.read_text())
        except (OSError, ValueError):
            raise HarnessError(f"the job's process died (exit code {code}) before it finished; its run is "
                               "marked KILLED when the sweep is resumed, and runs again") from None
    if kind == "harness":
        raise HarnessError(value)
    if kind == "error":
        raise RuntimeError(f"the job failed in its child process:\n{value}")
    return value


def _child(job: Path, result: Path) -> None:
    spec = json.loads(job.read_text())
    try:
        from harness.pipeline import run

        out = ("ok", run(OmegaConf.create(spec["cfg"]), spec["context"]))
    except HarnessError as e:
        out = ("harness", str(e))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        out = ("error", traceback.format_exc())
    result.write_text(json.dumps(out))


if __name__ == "__main__":
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
