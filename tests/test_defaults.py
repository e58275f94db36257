"""One source of truth per default: every value an option YAML of ``conf/`` writes for a
constructor parameter that has a default must equal that default.

A user who builds a component in Python (``SRG()``) and one who picks the option
(``metrics=srg``) must get the same thing. So for every option of every config group whose node
has a ``_target_`` (metrics and text_metrics options are nested one level under their name;
nested nodes with their own ``_target_``, e.g. a judge's ``mllm``, are checked too), the target is
imported, its signature read, and each YAML key is compared with the parameter's default:

- a key that names no parameter of a target without ``**kwargs`` is an error (a typo, or an
  option the code dropped);
- a key whose parameter has no default (required), or whose value is ``???``, is not compared;
- interpolations of the main config's plain top-level values (``${seed}``, ``${device}``) are
  resolved against ``conf/config.yaml``; others (paths, environment, other nodes) are skipped, as
  they depend on the machine or on other options;
- sequences compare as lists (a tuple default equals a YAML list); a ``None`` default equals an
  empty mapping or list (the code's idiom for "none"; ``{}`` in YAML can be extended with
  ``key.sub=value`` on the command line);
- a mapping for a parameter typed with a dataclass (``decoding: dict | Decoding | None``) is
  compared field by field with the dataclass's defaults, and a key that is no field is an error.

Two kinds of option set values on purpose, and are the exceptions:

- a *preset* extends a sibling option (its defaults list names it, e.g. ``mllm/llava15``
  extends ``mllm/transformers``): what it sets is its point; what it inherits is checked in the
  sibling, its keys are still checked to be parameters;
- a *variant* differs from the code in a value that is the option's reason to exist
  (``srg_softmax``'s ``output``); each is listed in :data:`VARIANTS` with the reason, and the
  test fails when a listed value no longer differs.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from harness import CONF_DIR

NESTED_GROUPS = {"metrics", "text_metrics"}  # options nested one level under their name
ROOT_REF = re.compile(r"^\$\{(\w+)\}$")

#: (option node, key) -> why the option sets a value other than the code's default.
VARIANTS: dict[tuple[str, str], str] = {
    ("dataset/cifar10", "n"): "the first 256 of the 1017 bundled test images, sized for CPU runs; "
                              "npz_images reads a whole file by default",
    ("dataset/imagenet_samples", "classes_column"): "the bundled classes.tsv's column of names",
    ("dataset/imagenet_samples", "label_regex"): "the bundled samples carry their label in the file name",
    ("metrics/srg_softmax.srg_softmax", "output"): "the option is SRG on the softmax probability",
    ("xai/freemcg.denoiser", "name"): "the cache folder says which data the denoiser models",
    ("xai/freemcg.denoiser.train_data", "n"): "the denoiser trains on 8000 generated images, not a test set's 64",
    ("xai/freemcg.denoiser.train_data", "split"): "it trains on the train split, never on the explained test images",
    ("xai/freemcg.denoiser.val_data", "n"): "its held-out error is measured on 256 images",
    ("xai/freemcg.denoiser.val_data", "split"): "held out: the val split",
    ("metrics/srg_softmax.srg_softmax", "name"): "logged beside srg, under its own name",
    ("metrics/artifact_mass.artifact_mass", "region"): "the option is region_mass on each image's planted artifacts",
    ("metrics/artifact_mass.artifact_mass", "name"): "logged under its own name, beside a region_mass on a box",
    ("prompt/expert", "audience"): "the prompt's audience",
    ("prompt/security_analyst", "audience"): "the prompt's audience",
    ("prompt/security_analyst", "system"): "the prompt's system message",
    ("prompt/structured", "response_format"): "the prompt asks for JSON",
    ("prompt/concepts", "response_format"): "the prompt asks for JSON (a name per concept)",
    ("text_metrics/judge.judge.mllm", "decoding.max_new_tokens"): "a judge answers with short scores",
    ("xai/cplrp", "mode"): "the option is CP-LRP (attention held constant)",
}


def _root_values() -> dict[str, Any]:
    root = OmegaConf.load(Path(CONF_DIR) / "config.yaml")
    return {k: v for k, v in OmegaConf.to_container(root, resolve=False).items()
            if isinstance(v, str | int | float | bool) and not (isinstance(v, str) and "${" in v)}


@functools.cache
def _compose(group: str, option: str) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+{group}={option}"])
    return OmegaConf.to_container(cfg[group], resolve=False)


def _is_preset(group: str, option: str) -> bool:
    """Does the option's defaults list name a sibling option (``- transformers``)?"""
    raw = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / group / f"{option}.yaml"), resolve=False)
    return any(isinstance(d, str) and d != "_self_" and (Path(CONF_DIR) / group / f"{d}.yaml").exists()
               for d in raw.get("defaults", []))


def _dataclass_of(target: Any, param: str) -> Any:
    """The dataclass named in the type of ``param`` of ``target`` (or of a base class's
    ``__init__`` the parameter is passed on to), if any."""
    for fn in [c.__init__ for c in target.__mro__] if inspect.isclass(target) else [target]:
        try:
            hint = typing.get_type_hints(fn).get(param)
        except Exception:  # noqa: BLE001 - unresolvable annotations: no dataclass to compare with
            continue
        if dc := next((t for t in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(t)), None):
            return dc
    return None


def _options() -> list[tuple[str, str]]:
    """``(group, option)`` of the job's config groups (``conf/hydra/``, Hydra's own groups such
    as the sweeper, are composed by Hydra into its own config and left out)."""
    return sorted((p.parent.name, p.stem) for p in Path(CONF_DIR).glob("*/*.yaml") if p.parent.name != "hydra")


def _target(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _plain(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _interpolated(v: Any) -> bool:
    if isinstance(v, str):
        return "${" in v
    if isinstance(v, list | tuple):
        return any(_interpolated(x) for x in v)
    if isinstance(v, dict):
        return any(_interpolated(x) for x in v.values())
    return False


def _nodes(node: Any, where: str):
    """Every dict with a ``_target_`` inside ``node``, with its place."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield where, node
        for k, v in node.items():
            yield from _nodes(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _nodes(v, f"{where}[{i}]")


def check_option(group: str, option: str, root: dict[str, Any]) -> tuple[list[str], int, set[tuple[str, str]]]:
    """``(problems, number of defaults compared, variants met)`` for one option of a group."""
    cfg = _compose(group, option)
    preset = _is_preset(group, option)
    tops = cfg.items() if group in NESTED_GROUPS else [(None, cfg)]
    problems, compared, variants = [], 0, set()

    def compare(where: str, key: str, value: Any, default: Any, target: str) -> None:
        nonlocal compared
        if isinstance(value, str) and (m := ROOT_REF.match(value)) and m.group(1) in root:
            value = root[m.group(1)]
        if _interpolated(value) or preset:
            return
        compared += 1
        same = _plain(value) == _plain(default) or (default is None and value in ({}, []))
        if (where, key) in VARIANTS:
            variants.add((where, key))
            if same:
                problems.append(f"{where}.{key}: listed in VARIANTS but equals the code default {default!r}")
        elif not same:
            problems.append(f"{where}.{key}: YAML {value!r} != code default {default!r} ({target})")

    for key, top in tops:
        place = f"{group}/{option}" + (f".{key}" if key else "")
        for where, node in _nodes(top, place):
            target = _target(node["_target_"])
            params = inspect.signature(target).parameters
            var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
            for k, v in node.items():
                if k.startswith("_"):
                    continue
                if k not in params or params[k].kind in (inspect.Parameter.VAR_POSITIONAL,
                                                          inspect.Parameter.VAR_KEYWORD):
                    if not var_kw:
                        problems.append(f"{where}.{k}: not a parameter of {node['_target_']}")
                    continue
                default = params[k].default
                if default is inspect.Parameter.empty or v == "???":
                    continue
                if isinstance(v, dict) and "_target_" in v:
                    continue  # a nested component, checked on its own
                if isinstance(v, dict) and (dc := _dataclass_of(target, k)) is not None:
                    fields = {f.name: f for f in dataclasses.fields(dc)}
                    for fk, fv in v.items():
                        if fk not in fields:
                            problems.append(f"{where}.{k}.{fk}: not a field of {dc.__name__}")
                        elif fields[fk].default is not dataclasses.MISSING:
                            compare(where, f"{k}.{fk}", fv, fields[fk].default, f"{dc.__module__}.{dc.__name__}")
                    continue
                compare(where, k, v, default, node["_target_"])
    return problems, compared, variants


OPTIONS = _options()


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_yaml_values_equal_code_defaults(group, option):
    cfg = OmegaConf.load(Path(CONF_DIR) / group / f"{option}.yaml")
    if not any(True for _ in _nodes(OmegaConf.to_container(cfg, resolve=False), "")) and "defaults" not in cfg:
        pytest.skip(f"{group}/{option} builds nothing (no _target_)")
    problems, _, _ = check_option(group, option, _root_values())
    assert not problems, "\n".join(problems)


def test_every_group_is_checked():
    """The check reaches every group that builds components, and compares defaults in all."""
    groups = {g for g, _ in OPTIONS}
    assert {"xai", "metrics", "text_metrics", "render", "prompt", "mllm", "dataset", "model",
            "tracking"} <= groups
    root = _root_values()
    counted = {g: 0 for g in groups}
    variants = set()
    for g, o in OPTIONS:
        _, n, met = check_option(g, o, root)
        counted[g] += n
        variants |= met
    assert all(counted[g] > 0 for g in groups), counted
    assert sum(counted.values()) > 200, counted
    assert variants == set(VARIANTS), f"VARIANTS lists options or keys that do not exist: {set(VARIANTS) - variants}"


def test_the_check_catches_a_difference(monkeypatch):
    """A YAML value that differs from the code, and a key that is no parameter, are reported."""
    import harness.evaluation.pointing_game as pg

    class Probe(pg.PointingGame):
        def __init__(self, tolerance: int = 7, name: str = "pointing_game") -> None:
            super().__init__(tolerance, name)

    monkeypatch.setattr(pg, "Probe", Probe, raising=False)
    node = {"_target_": "harness.evaluation.pointing_game.Probe", "tolerance": 1, "tolerence": 2}
    monkeypatch.setattr(sys.modules[__name__], "_compose", lambda g, o: {"pointing_game": node})
    monkeypatch.setattr(sys.modules[__name__], "_is_preset", lambda g, o: False)
    problems, compared, _ = check_option("metrics", "pointing_game", {})
    assert compared == 1
    assert any("tolerance: YAML 1 != code default 7" in p for p in problems), problems
    assert any("tolerence: not a parameter" in p for p in problems), problems
