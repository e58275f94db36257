"""Credentials kept out of everything a job writes: MLflow params and tags, ``config.yaml``,
Hydra's output folder.

Keys belong in the environment (``mllm.api_key_env`` names the variable; the client reads it
when it sends a request). A value in the config counts as a credential when

- its key's last part names one (``api_key``, ``token``, ``secret``, ``password``,
  ``credential``, ``auth``...; not the ``*_env`` / ``*_name`` / ``*_file`` keys that only
  point at one), or
- it has the shape of a known token (OpenAI ``sk-...``, Hugging Face ``hf_...``, GitHub
  ``ghp_...`` / ``github_pat_...``, GitLab ``glpat-...``, AWS ``AKIA...``, Slack ``xox?-...``,
  JWTs, ``Bearer ...``), anywhere in a text (a prompt included), or
- it contains the value of an environment variable that holds a credential (a name as above,
  or the one ``mllm.api_key_env`` names), e.g. through ``${oc.env:...}``.

Each is replaced by ``REDACTED`` in the config the job runs with (so it is neither used nor
stored), in the overrides recorded as tags, and in the files Hydra has already written for the
job (``.hydra/*.yaml``, the sweep's ``multirun.yaml``), with a warning that says how to pass a
key through the environment.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REDACTED = "REDACTED"
SECRET_KEY = re.compile(r"(api[_-]?key|apikey|token|secret|passw(or)?d|passphrase|credential|auth|bearer|private[_-]?key)",
                        re.IGNORECASE)
POINTER_KEY = re.compile(r"(_env|_name|_file|_path|_var)$", re.IGNORECASE)
TOKEN = re.compile(
    r"(sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|glpat-[A-Za-z0-9_\-]{20,}|AKIA[0-9A-Z]{16}|xox[abposr]-[A-Za-z0-9\-]{10,}"
    r"|eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}|Bearer\s+[A-Za-z0-9._\-]{12,})")


def _could_be_credential(value: str) -> bool:
    """A number, a boolean or null is never a credential (``max_new_tokens=64`` is not one)."""
    if value.lower() in ("true", "false", "null", "none", REDACTED.lower()):
        return False
    try:
        float(value)
        return False
    except ValueError:
        return bool(value)


def _names_credential(key: str) -> bool:
    return bool(SECRET_KEY.search(key)) and not POINTER_KEY.search(key)


def environment_secrets(extra_names: Iterable[str] = ()) -> list[str]:
    """Values of environment variables that hold credentials (8 characters or more)."""
    names = set(extra_names)
    return sorted({v for k, v in os.environ.items()
                   if (k in names or _names_credential(k)) and len(v) >= 8},
                  key=len, reverse=True)


def find(plain: Any, env: list[str], prefix: str = "") -> dict[str, str]:
    """``{key: secret text}`` of the credentials in a plain (resolved) config."""
    out: dict[str, str] = {}
    if isinstance(plain, dict):
        for k, v in plain.items():
            key = f"{prefix}{k}"
            if isinstance(v, str) and _could_be_credential(v) and _names_credential(str(k)):
                out[key] = v
            else:
                out.update(find(v, env, f"{key}."))
    elif isinstance(plain, list):
        for i, v in enumerate(plain):
            out.update(find(v, env, f"{prefix}{i}."))
    elif isinstance(plain, str):
        for m in TOKEN.finditer(plain):
            out[prefix.rstrip(".") or "value"] = m.group(0)
        for value in env:
            if value in plain:
                out[prefix.rstrip(".") or "value"] = value
    return out


MIN_LENGTH = 6  # shorter secrets are not replaced inside other text (they would match everywhere)


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each secret of at least :data:`MIN_LENGTH` characters, and every token
    shape, replaced by :data:`REDACTED`."""
    for s in sorted({s for s in secrets if len(s) >= MIN_LENGTH}, key=len, reverse=True):
        text = text.replace(s, REDACTED)
    return TOKEN.sub(REDACTED, text)


def redact(obj: Any, secrets: Iterable[str]) -> Any:
    """``obj`` (plain dicts, lists, strings) with every secret text replaced."""
    secrets = list(secrets)
    if isinstance(obj, dict):
        return {k: redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


def redacted_config(cfg: Any) -> tuple[Any, dict[str, str]]:
    """The config with its credentials replaced (see the module docstring), and what was found."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    api_env = [str(v)] if (v := OmegaConf.select(cfg, "mllm.api_key_env", default=None)) else []
    found = find(plain, environment_secrets(api_env))
    if not found:
        return cfg, {}
    keys = ", ".join(sorted(found))
    log.warning("%s look%s like a credential: replaced by %s in the job's config, params and files. Keys belong "
                "in the environment: export the key as a variable and name it with mllm.api_key_env=NAME",
                keys, "s" if len(found) == 1 else "", REDACTED)
    clean = OmegaConf.create(redact(plain, found.values()))
    for key, value in found.items():  # a value of a key that names a credential goes whole, however short
        if OmegaConf.select(clean, key, default=None) == value:
            OmegaConf.update(clean, key, REDACTED)
    return clean, found


def redact_files(secrets: Iterable[str], *files: str | os.PathLike) -> None:
    """Rewrite files (Hydra's ``.hydra/*.yaml``, ``multirun.yaml``) with the secrets replaced."""
    secrets = list(secrets)
    for f in files:
        p = Path(f)
        if not p.is_file():
            continue
        text = p.read_text()
        clean = redact_text(text, secrets)
        if clean != text:
            p.write_text(clean)


def _credential_value(override: str) -> str | None:
    """The value of ``key=value`` when its key names a credential (and the value could be one)."""
    key, eq, value = override.partition("=")
    last = key.lstrip("+~").split(".")[-1].split("@")[0]
    return value if eq and _could_be_credential(value) and _names_credential(last) else None


def override_secrets(overrides: Iterable[str]) -> list[str]:
    """The credential texts in command-line overrides: values of keys that name one, token
    shapes, and values of credential environment variables."""
    env = environment_secrets()
    out = []
    for o in overrides:
        if (value := _credential_value(o)) is not None:
            out.append(value)
        out += [m.group(0) for m in TOKEN.finditer(o)] + [v for v in env if v in o]
    return out


def redact_overrides(overrides: Iterable[str]) -> list[str]:
    """Command-line overrides with their credentials replaced (:func:`override_secrets`): the
    whole value of a key that names a credential, and credential texts anywhere."""
    overrides = list(overrides)
    secrets = override_secrets(overrides)
    return [f"{o.partition('=')[0]}={REDACTED}" if _credential_value(o) is not None else redact_text(o, secrets)
            for o in overrides]


class _RedactRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message, override_secrets(message.split()))
        if clean != message:
            record.msg, record.args = clean, ()
        return True


LAUNCHER_LOGGERS = ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.hydra_joblib_launcher._core",
                    "hydra_plugins.hydra_submitit_launcher.submitit_launcher")


@contextmanager
def redacted_logs(names: Iterable[str] = LAUNCHER_LOGGERS) -> Iterator[None]:
    """While the block runs, the log lines of the loggers ``names`` (Hydra's launchers, which
    print each job's overrides) carry no credentials; the loggers are as before afterwards."""
    loggers = [logging.getLogger(n) for n in names]
    f = _RedactRecords()
    for lg in loggers:
        lg.addFilter(f)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(f)
