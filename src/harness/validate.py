"""Mistakes in a command line or config, found before any heavy import: one line each.

Three checks, each answering with one line that names the key, the value and what is expected:

- :func:`unknown_option`: ``group=value`` selects an option its group does not have (sweeps
  ``group=a,b`` and lists ``group=[a,b]`` included), with the nearest options (``did you mean
  shap?``). Files only, before Hydra composes anything.
- :func:`first_job_problem`: ``a.b=value`` sets a key the composed config does not have (a typo
  such as ``dataset.nn=3``, with the nearest keys), or a value :func:`check` refuses; composes
  the sweep's first job once, and only when the command line sets keys, so a mistake is one
  line in well under a second, before the store is opened.
- :func:`check`: a composed job config: values still mandatory (``???``), each key the command
  line set against the type of the value its option's YAML writes (an integer where the option
  writes an integer, a number where it writes a number, true/false, a list, a mapping; keys
  whose YAML value is text or null take anything), lower bounds (:data:`MINIMUM`) and closed
  choices (``target``, ``isolation``, ``resume``).

Sweep functions, interpolations and command lines that add search paths are left to Hydra.
"""

from __future__ import annotations

import difflib
import re
from functools import cache
from pathlib import Path
from typing import Any

from harness.types import HarnessError

OVERRIDE = re.compile(r"^[+]{0,2}(?P<group>[a-z_][a-z0-9_]*(?:/[a-z_][a-z0-9_]*)*)(?:@[^=]*)?=(?P<value>.*)$")
KEY = re.compile(r"^(?P<key>[A-Za-z_][\w]*(?:\.[\w]+)+)=")
# keys of an open mapping (constructor arguments such as model.kwargs): set without a `+`
OPEN_KEY = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?:model_)?kwargs\.\w[\w.]*=")

# lower bounds of numeric options (value >= bound; None always allowed where the option allows it)
MINIMUM: dict[str, float] = {
    "batch_size": 1, "dataset.n": 1, "dataset.start": 0, "dataset.image_size": 8, "max_overlays": 0,
    "language.n_images": 1, "mllm.decoding.num_samples": 1, "mllm.decoding.max_new_tokens": 1,
    "mllm.decoding.min_new_tokens": 0, "mllm.concurrency": 1, "mllm.max_retries": 0, "mllm.timeout_s": 0.001,
    "mllm.backoff_s": 0, "model.epochs": 1, "model.batch_size": 1, "model.n_train": 1, "model.n_val": 1,
    "xai.batch_size": 1, "xai.n_samples": 1, "xai.n_steps": 1, "xai.max_evals": 1, "xai.num_samples": 1,
    "tracking.heartbeat_s": 0.001, "tracking.stale_after_s": 0.001,
}


def open_keys(overrides: list[str]) -> list[str]:
    """The overrides with each key of an open mapping (``model.kwargs.img_size=32``: any
    constructor argument) made Hydra's set-or-add ``++model.kwargs.img_size=32``, since a key
    the YAML does not list could otherwise only be added with ``+``. Entry points that take
    overrides (``python -m harness``, ``harness.check``) pass them through this."""
    return [f"++{o}" if OPEN_KEY.match(o) else o for o in overrides]


def _choices() -> dict[str, tuple[Any, ...]]:
    from harness.isolation import MODES
    from harness.types import TARGETS

    return {"target": TARGETS, "isolation": MODES, "resume": (True, False)}


def _near(word: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(word, valid, n=3, cutoff=0.6)
    return f"did you mean {' or '.join(near)}? " if near else ""


def options(group_dir: Path) -> list[str]:
    return sorted(p.stem for p in group_dir.glob("*.yaml"))


def unknown_option(argv: list[str], conf_dir: Path, experiments_dir: Path) -> str | None:
    """The first override that selects an option its group does not have, as one line (or None)."""
    if any(a.startswith("hydra.searchpath") for a in argv):
        return None
    for arg in argv:
        m = OVERRIDE.match(arg)
        if m is None:
            continue
        group, value = m["group"], m["value"].strip()
        if group.startswith("hydra/"):  # Hydra's own groups: plugins add options conf/ does not list
            continue
        folder = experiments_dir / "experiment" if group == "experiment" else conf_dir / group
        if not folder.is_dir() or any(c in value for c in "()$"):
            continue
        if value == "null":
            none = " (or its option none)" if (folder / "none.yaml").is_file() else ""
            return f"{group}=null: a config group is dropped with ~{group}{none}, not set to null"
        valid = options(folder)
        for v in (x.strip() for x in value.strip("[]").split(",")):
            if v and v != "null" and v not in valid:
                return f"{group}={v} is not an option of {group}: {_near(v, valid)}valid: {', '.join(valid)}"
    return None


def first_job(overrides: list[str]) -> list[str]:
    """The overrides of a sweep's first job (each swept key at its first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            out.append(o.input_line)
    return out


def swept_keys(overrides: list[str]) -> list[tuple[str, list[Any]]]:
    """``(key, values)`` of each swept override (values parsed as Hydra parses them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [(o.key_or_group, list(o.sweep_iterator())) for o in OverridesParser.create().parse_overrides(overrides)
            if o.is_sweep_override() and o.is_discrete_sweep()]


def first_job_problem(argv: list[str], conf_dir: Path, config_name: str = "config") -> str | None:
    """The first mistake in the keys the command line sets, as one line (or None): a key the
    composed config lacks (with the nearest keys), or a value :func:`check` refuses. Composes
    the sweep's first job once, and only when the command line sets keys."""
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    keys = [a for a in overrides if (m := re.match(r"^\+{0,2}([A-Za-z_][\w.]*)=", a)) and "/" not in m[1]
            and not (conf_dir / m[1]).is_dir() and m[1].split(".")[0] not in ("experiment", "hydra")]
    if not keys or any(a.startswith("hydra.searchpath") for a in argv):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict

    try:
        job = first_job(overrides)
    except Exception:  # noqa: BLE001 - a grammar error: Hydra's own message says it best
        return None
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        try:
            cfg = compose(config_name, overrides=job, return_hydra_config=True)
        except HydraException as e:
            m = re.search(r"Could not override '([^']+)'", str(e))
            if m is None or "To append to your config use +" not in str(e):
                return None
            bad = m[1]
            try:
                cfg = compose(config_name, overrides=[o for o in job if not o.startswith(f"{bad}=")])
            except HydraException:
                return None
            parent, _, leaf = bad.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if not OmegaConf.is_dict(node):
                return f"{bad}: {parent} has no keys (it is {node!r})"
            valid = sorted(str(k) for k in node.keys())
            value = next(a for a in keys if a.startswith(f"{bad}=")).split("=", 1)[1]
            return (f"{bad}={value}: {parent or 'the config'} has no key {leaf!r}: {_near(leaf, valid)}keys: "
                    f"{', '.join(valid)} (a new key is added with +{bad}={value})")
        hc = HydraConfig.instance()
        parent_cfg = hc.cfg
        try:
            hc.set_config(cfg)
            choices = {g: str(o) for g, o in cfg.hydra.runtime.choices.items() if o is not None}
            with open_dict(cfg):
                del cfg["hydra"]
            check(cfg, job, choices, conf_dir)
            for key, values in swept_keys(overrides):
                if key not in choices:
                    for v in values:
                        check_value(key, v, choices, conf_dir)
        except HarnessError as e:
            return str(e)
        finally:
            hc.cfg = parent_cfg
    return None


@cache
def _yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.load(path) if path.is_file() else None


def default_of(key: str, choices: dict[str, str], conf_dir: Path) -> tuple[bool, Any]:
    """(found, value) of ``key`` as written in the YAML of the option that defines it, or in
    ``config.yaml`` for top-level keys."""
    from omegaconf import OmegaConf

    head, _, rest = key.partition(".")
    if head in choices and rest and (doc := _yaml(conf_dir / head / f"{choices[head]}.yaml")) is not None:
        path, doc_key = doc, rest
    else:
        path, doc_key = _yaml(conf_dir / "config.yaml"), key
    if path is None:
        return False, None
    missing = object()
    value = OmegaConf.select(path, doc_key, default=missing, throw_on_resolution_failure=False)
    return (value is not missing), (None if value is missing else value)


def _expected(default: Any) -> tuple[tuple[type, ...], str] | None:
    from omegaconf import DictConfig, ListConfig

    if isinstance(default, bool):
        return (bool,), "true or false"
    if isinstance(default, int):
        return (int,), "an integer"
    if isinstance(default, float):
        return (int, float), "a number"
    if isinstance(default, ListConfig | list):
        return (list, tuple, ListConfig), "a list"
    if isinstance(default, DictConfig | dict):
        return (dict, DictConfig), "a mapping"
    return None  # text or null: anything goes (e.g. patch: auto also takes 8)


def _missing(node: Any, prefix: str = "") -> list[str]:
    """Keys whose value is still ``???``, without resolving anything."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _missing(v, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _missing(v, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "???" else []


def check_value(key: str, value: Any, choices: dict[str, str], conf_dir: Path) -> None:
    """Raise a one-line :class:`HarnessError` when ``value`` does not fit ``key`` (type of the
    option's YAML value, :data:`MINIMUM`, the closed choices)."""
    if value is None:
        return
    found, default = default_of(key, choices, conf_dir)
    if found and (want := _expected(default)) is not None:
        types, what = want
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise HarnessError(f"{key}={value!r}: expected {what} (the option writes {key}: {default})")
    if key in MINIMUM and isinstance(value, int | float) and not isinstance(value, bool) and value < MINIMUM[key]:
        raise HarnessError(f"{key}={value}: must be at least {MINIMUM[key]:g}")
    valid = _choices().get(key)
    if valid is not None and value not in valid:
        names = [str(v).lower() for v in valid]
        raise HarnessError(f"{key}={value!r} is not valid: {_near(str(value), names)}valid: {', '.join(names)}")


def check(cfg: Any, overrides: list[str], choices: dict[str, str], conf_dir: Path) -> None:
    """Raise a one-line :class:`HarnessError` for the first mistake in a composed job config."""
    from omegaconf import OmegaConf

    for key in _missing(OmegaConf.to_container(cfg, resolve=False)):
        group = key.split(".")[0]
        option = f" ({group}={choices[group]})" if group in choices else ""
        raise HarnessError(f"{key} is mandatory{option} and has no value: set {key}=...")
    for o in overrides:
        m = KEY.match(o.lstrip("+")) or re.match(r"^(?P<key>[A-Za-z_]\w*)=", o)
        if m is None or m["key"] in choices or m["key"].startswith("hydra"):
            continue
        key = m["key"]
        try:
            value = OmegaConf.select(cfg, key)
        except Exception:  # noqa: BLE001 - an interpolation only the job can resolve: its own check
            continue
        if value is None:
            continue
        check_value(key, value, choices, conf_dir)
    for key in _choices():
        if key in cfg:
            check_value(key, cfg[key], choices, conf_dir)
