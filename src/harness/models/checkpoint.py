"""Weights from a local file: tensors only, keys renamed by patterns, a table on mismatch, and
the preprocessing the checkpoint itself records.

A checkpoint is read with ``torch.load(weights_only=True)`` (or safetensors): a file that would
run code is refused. The weights may sit at the top of the file or under ``state_dict``,
``model`` or ``model_state_dict`` (timm's training script, lightning, most research code); a
``module.`` prefix (``DataParallel``) is dropped. ``key_map`` renames the rest: a list of
``[pattern, replacement]`` pairs (regular expressions, applied in order with :func:`re.sub`), or
a mapping of the same from a YAML file.

Preprocessing found in the checkpoint (input size, crop, mean, std, interpolation) comes from,
in order: a ``pretrained_cfg`` or ``data_config`` mapping in the file, the ``args`` timm's
training script saves, the safetensors header's metadata, a ``config.json`` beside the file
(timm's hub format: ``{"architecture": ..., "pretrained_cfg": {...}}``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.types import HarnessError

WEIGHT_KEYS = ("state_dict", "model", "model_state_dict")
TABLE_ROWS = 12  # rows of each column of the mismatch table


@dataclass
class Checkpoint:
    """A checkpoint's weights and the preprocessing it records (``meta``: ``input_size``,
    ``crop_pct``, ``mean``, ``std``, ``interpolation``, whichever it has; ``meta_source``: where
    they were found)."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    meta_source: str | None = None


def key_rules(key_map: Any) -> list[tuple[re.Pattern[str], str]]:
    """``key_map`` (pairs or a mapping) as compiled rules, with a clear error for a bad one."""
    if not key_map:
        return []
    items = list(key_map.items()) if isinstance(key_map, Mapping) else list(key_map)
    rules = []
    for item in items:
        if isinstance(item, str) or len(item) != 2:
            raise HarnessError(f"model.key_map entry {item!r} is not a [pattern, replacement] pair "
                               "(e.g. model.key_map=[['^backbone\\.','']])")
        pattern, repl = item
        try:
            rules.append((re.compile(str(pattern)), "" if repl is None else str(repl)))
        except re.error as e:
            raise HarnessError(f"model.key_map pattern {pattern!r} is not a regular expression: {e}") from None
    return rules


def rename(keys: Iterable[str], rules: list[tuple[re.Pattern[str], str]]) -> dict[str, str]:
    """Old key to new key, each rule applied in order; two keys renamed to one is an error."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for k in keys:
        new = k.removeprefix("module.")
        for pattern, repl in rules:
            new = pattern.sub(repl, new)
        if new in seen:
            raise HarnessError(f"model.key_map renames both {seen[new]!r} and {k!r} to {new!r}")
        seen[new] = k
        out[k] = new
    return out


def _load(p: Path) -> Any:
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:  # timm's training script saves its argparse Namespace: allowed, nothing else that runs code
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, pickle with code, TorchScript archive
        raise HarnessError(
            f"cannot read checkpoint {p} as tensors only ({type(e).__name__}: {_load_error(e)}). "
            "The harness loads no checkpoint that can run code: save the weights alone "
            "(torch.save(model.state_dict(), path), or safetensors) and point at that file") from None


def _load_error(e: Exception) -> str:
    """What torch.load(weights_only=True) found, without its advice to load the file unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    if m := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"it would import {m.group(1)}, code rather than tensors"
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else "no details"


def _preprocessing(cfg: Any) -> dict[str, Any]:
    """The preprocessing keys of a pretrained_cfg-like mapping (timm names), Nones dropped."""
    if isinstance(cfg, argparse.Namespace):
        cfg = vars(cfg)
    if not isinstance(cfg, Mapping):
        return {}
    out: dict[str, Any] = {}
    size = cfg.get("input_size") or cfg.get("img_size")
    if size is not None:
        out["input_size"] = int(size[-1] if isinstance(size, list | tuple) else size)
    for key in ("crop_pct", "mean", "std", "interpolation"):
        # timm's train.py leaves interpolation '' for "the model's own"
        if (value := cfg.get(key)) is not None and not (isinstance(value, str) and not value):
            out[key] = value
    if isinstance(out.get("crop_pct"), int | float) and not 0 < out["crop_pct"] <= 1:
        out.pop("crop_pct")
    for key in ("mean", "std"):
        if key in out and (not isinstance(out[key], list | tuple) or len(out[key]) != 3):
            out.pop(key)
    return out


def _safetensors_meta(p: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        raw = f.metadata() or {}
    decoded = {}
    for k, v in raw.items():
        try:
            decoded[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            decoded[k] = v
    return _preprocessing(decoded.get("pretrained_cfg", decoded))


def read_checkpoint(path: str | os.PathLike, key_map: Any = None) -> Checkpoint:
    """The weights in ``path`` (keys renamed by ``key_map``) and the preprocessing it records."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = [p / n for n in ("model.safetensors", "pytorch_model.bin", "model.pth") if (p / n).is_file()]
        if not found:
            raise HarnessError(f"checkpoint folder {p} has no model.safetensors, pytorch_model.bin or model.pth")
        p = found[0]
    if not p.is_file():
        raise HarnessError(f"checkpoint not found: {p}")
    raw = _load(p)
    meta, source = {}, None
    if isinstance(raw, dict):
        for key in ("pretrained_cfg", "data_config", "args"):
            if meta := _preprocessing(raw.get(key)):
                source = f"the checkpoint's {key!r}"
                break
    if not meta and p.suffix == ".safetensors" and (meta := _safetensors_meta(p)):
        source = "the safetensors metadata"
    if not meta and (cfg_file := p.with_name("config.json")).is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise HarnessError(f"{cfg_file} is not readable JSON: {e}") from None
        if meta := _preprocessing(cfg.get("pretrained_cfg", cfg) if isinstance(cfg, dict) else None):
            source = str(cfg_file)
    sd = raw
    for key in WEIGHT_KEYS:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise HarnessError(f"checkpoint {p} holds no state_dict (a mapping of names to tensors)")
    names = rename(sd, key_rules(key_map))
    return Checkpoint(p, {names[k]: v for k, v in sd.items()}, meta, source)


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """A key_map that would turn the unexpected keys into the missing ones, where one prefix
    renaming does for most of them."""
    prefixes: dict[str, set[str]] = {}
    for m in missing:
        parts = m.split(".")
        for i in range(len(parts) - 1):  # tails of at least two components ("layer.weight")
            prefixes.setdefault(".".join(parts[i:]), set()).add(".".join(parts[:i]))
    votes: Counter[tuple[str, str]] = Counter()
    for u in unexpected:
        parts = u.split(".")
        for i in range(len(parts) - 1):
            if len(found := prefixes.get(".".join(parts[i:]), ())) == 1:
                old, new = ".".join(parts[:i]), next(iter(found))
                votes[(old + "." if old else "", new + "." if new else "")] += 1
                break
    if not votes:
        return ""
    (old, new), n = votes.most_common(1)[0]
    if 2 * n < min(len(missing), len(unexpected)):
        return ""
    return (f"\n{n} of the unexpected keys fit with the prefix {old!r} renamed to {new!r}: "
            f"model.key_map=[['^{re.escape(old)}','{new}']]")


def mismatch_table(net: nn.Module, sd: Mapping[str, torch.Tensor]) -> str | None:
    """A table of the keys the model lacks, the keys it does not know and the shapes that
    differ; ``None`` when the state dict fits."""
    own = net.state_dict()
    # BatchNorm fills a missing counter itself (checkpoints from before it existed)
    missing = sorted(k for k in set(own) - set(sd) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if not (missing or unexpected or shapes):
        return None
    width = max([len("missing from the checkpoint"), *map(len, missing[:TABLE_ROWS])]) + 2
    lines = [(f"{len(missing)} keys missing from the checkpoint, {len(unexpected)} unexpected, "
              f"{len(shapes)} of another shape"), f"  {'missing from the checkpoint':<{width}}unexpected in the checkpoint"]
    for i in range(min(TABLE_ROWS, max(len(missing), len(unexpected)))):
        a = missing[i] if i < len(missing) else ""
        b = unexpected[i] if i < len(unexpected) else ""
        lines.append(f"  {a:<{width}}{b}")
    if max(len(missing), len(unexpected)) > TABLE_ROWS:
        lines.append(f"  ... ({max(len(missing), len(unexpected)) - TABLE_ROWS} more rows)")
    for k in shapes[:TABLE_ROWS]:
        lines.append(f"  shape of {k}: model {list(own[k].shape)}, checkpoint {list(sd[k].shape)}")
    if len(shapes) > TABLE_ROWS:
        lines.append(f"  ... ({len(shapes) - TABLE_ROWS} more shapes)")
    return "\n".join(lines) + _prefix_hint(missing, unexpected)


def load_weights(net: nn.Module, checkpoint: Checkpoint | str | os.PathLike, key_map: Any = None) -> Checkpoint:
    """Load a checkpoint into ``net`` strictly; a mismatch is a :class:`HarnessError` with the
    table of :func:`mismatch_table`. Returns the checkpoint (for its preprocessing)."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint, key_map)
    try:
        net.load_state_dict(ckpt.state_dict)
    except RuntimeError as e:
        table = mismatch_table(net, ckpt.state_dict) or str(e)[:800]
        raise HarnessError(f"checkpoint {ckpt.path} does not fit {type(net).__name__}: {table}\n"
                           "Rename keys with model.key_map=[[pattern, replacement], ...] (regular expressions, "
                           "applied in order); the model's own keys are listed by net.state_dict().keys()") from None
    return ckpt


def resize_for(input_size: int, crop_pct: float | None) -> int | None:
    """The shorter side before the centre crop, as timm's eval transform computes it."""
    return None if not crop_pct else math.floor(input_size / float(crop_pct))
