"""Options of the config groups, checked on the command line before Hydra composes anything.

Hydra answers ``xai=shapp`` with ``Could not find 'xai/shapp'`` and the list of options; this
check says the same in one line with the nearest option (``did you mean shap?``), before any
import beyond the standard library. It looks only at ``group=value`` overrides (sweeps
``group=a,b`` and lists ``group=[a,b]`` included) of the groups in ``conf/`` and the study
presets in ``experiments/experiment``; sweep functions, interpolations, Hydra's own groups and
command lines that add search paths are left to Hydra.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

OVERRIDE = re.compile(r"^[+]{0,2}(?P<group>[a-z_][a-z0-9_]*)(?:@[^=]*)?=(?P<value>.*)$")


def options(group_dir: Path) -> list[str]:
    return sorted(p.stem for p in group_dir.glob("*.yaml"))


def unknown_option(argv: list[str], conf_dir: Path, experiments_dir: Path) -> str | None:
    """One line naming the first override that selects an option its group does not have (with
    the nearest options and all valid ones), or None."""
    if any(a.startswith("hydra.searchpath") for a in argv):
        return None
    for arg in argv:
        m = OVERRIDE.match(arg)
        if m is None:
            continue
        group, value = m["group"], m["value"].strip()
        folder = experiments_dir / "experiment" if group == "experiment" else conf_dir / group
        if not folder.is_dir() or any(c in value for c in "()$"):
            continue
        valid = options(folder)
        for v in (x.strip() for x in value.strip("[]").split(",")):
            if v and v != "null" and v not in valid:
                near = difflib.get_close_matches(v, valid, n=3, cutoff=0.6)
                hint = f"did you mean {' or '.join(near)}? " if near else ""
                return f"{group}={v} is not an option of {group}: {hint}valid: {', '.join(valid)}"
    return None
