"""Resume, decided for a whole sweep before any heavy import.

A job is identified by the hash of its resolved config (tag ``config_hash``). When a sweep
starts, :func:`index_finished` asks the store once for the hashes of the experiment's FINISHED
runs and writes them to ``<sweep dir>/finished_configs.json``; each job then looks itself up in
that file (:func:`finished_in_sweep`) before torch, timm or mlflow are imported. A job not in
the index (new, or finished by a concurrent sweep since) goes on to
:func:`harness.pipeline.run`, which asks the store again.

Composed job configs are remembered (:class:`JobConfigs`): to place a job the sweeper needs its
resolved config, and Hydra composes each job from about 20 YAML files (0.2 s a job, most of a
resumed sweep's time). A job's composed, *unresolved* config is a function of its overrides and
of the files the compose reads, so it is stored under a key of both (every file of the search
path, Hydra's ConfigStore, the Hydra and OmegaConf versions) in ``<paths.cache_dir>/composed``
and resolved afresh in each sweep: environment variables, ``${now:}`` and the project root are
read live, as in a compose. A config that reads the Hydra node beyond ``runtime.choices``, a job
that overrides Hydra's own settings, and one with credentials on its command line are always
composed.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import utils

INDEX = "finished_configs.json"
MEMO_FORMAT = 1  # bump when what a memo holds changes
HYDRA_REF = re.compile(r"\$\{hydra:([^}]*)\}")


def config_hash(cfg: Any) -> str:
    """SHA-256 of the resolved config (key order does not matter), in full."""
    return utils.config_hash(cfg, length=64)


def finished_runs(tracker: Any) -> dict[str, str]:
    """``{config_hash: run_id}`` of the FINISHED runs in the tracker's experiment (one query, paged)."""
    client = tracker.client()
    exp = client.get_experiment_by_name(tracker.experiment)
    out: dict[str, str] = {}
    token = None
    while exp is not None:
        page = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=5000, page_token=token)
        for r in page:
            if (h := r.data.tags.get("config_hash")) and h not in out:
                out[h] = r.info.run_id
        token = page.token
        if not token:
            break
    return out


def index_finished(tracker: Any, sweep_dir: str | Path, finished: dict[str, str] | None = None) -> None:
    """Write the store's finished configs (``finished``: as already known) to the sweep folder
    (called once as a sweep starts)."""
    folder = Path(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(finished_runs(tracker) if finished is None else finished))
    tmp.replace(folder / INDEX)


def finished_in_sweep(cfg: Any, sweep_dir: str | Path) -> str | None:
    """The run id that already finished this job's config, per the sweep's index (None: not
    known to be finished, or no index)."""
    try:
        index = json.loads((Path(sweep_dir) / INDEX).read_text())
    except (OSError, ValueError):
        return None
    return index.get(config_hash(cfg))


def mark_skipped(run_id: str, output_dir: str | None) -> None:
    """Leave ``skipped.json`` in the job's Hydra output folder, for the sweep summary."""
    if output_dir is None:
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skipped.json").write_text(json.dumps({"finished_run": run_id}))


def sources_digest(config_sources: Sequence[Any]) -> str:
    """SHA-256 of everything a compose over these sources (Hydra's ``runtime.config_sources``)
    can read: each folder's or package's files, and Hydra's ConfigStore (``structured``)."""
    import importlib.util

    import hydra
    import omegaconf

    h = hashlib.sha256(json.dumps([MEMO_FORMAT, hydra.__version__, omegaconf.__version__]).encode())
    for src in config_sources:
        schema, path = str(src["schema"]), str(src["path"])
        h.update(f"\0{schema}://{path}\0".encode())
        if schema == "structured":
            h.update(_config_store_text().encode())
            continue
        folders: list[Path] = []
        if schema == "file":
            folders = [Path(path)]
        elif schema == "pkg":
            try:
                spec = importlib.util.find_spec(path.replace("/", "."))
            except (ImportError, ValueError):
                spec = None
            folders = [Path(f) for f in (spec.submodule_search_locations or [])] if spec else []
        for folder in folders:
            for f in sorted(folder.rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts:
                    h.update(f"\0{f.relative_to(folder)}\0".encode())
                    h.update(f.read_bytes())
    return h.hexdigest()


def _config_store_text() -> str:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    out: list[str] = []

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for name, node in sorted(tree.items()):
            if isinstance(node, dict):
                walk(node, f"{prefix}{name}/")
            else:
                out.append(f"{prefix}{name} {node.package} {node.provider}\n{OmegaConf.to_yaml(node.node)}")

    walk(ConfigStore.instance().repo, "")
    return "\n".join(out)


def memo_key(config_name: str | None, overrides: Sequence[str], digest: str) -> str | None:
    """Where a job's composed config is remembered (None: this job is always composed)."""
    from harness.secrets import override_secrets

    if any(o.lstrip("+~").startswith("hydra") for o in overrides) or override_secrets(overrides):
        return None
    return hashlib.sha256(json.dumps([config_name, list(overrides), digest]).encode()).hexdigest()[:32]


def memo_folder(cache_dir: Any) -> Path | None:
    return Path(str(cache_dir)) / "composed" if cache_dir else None


def remember(folder: Path | None, key: str | None, task_cfg: Any, choices: Any) -> None:
    """Store a job's composed task config (hydra node removed, unresolved) and its group
    choices; a config that reads other Hydra values than ``runtime.choices`` is not stored."""
    from omegaconf import OmegaConf

    from harness.ownership import temp_name

    if folder is None or key is None:
        return
    text = OmegaConf.to_yaml(task_cfg)
    if any(not ref.strip().startswith("runtime.choices.") for ref in HYDRA_REF.findall(text)):
        return
    blob = zlib.compress(pickle.dumps((task_cfg, {str(k): v for k, v in choices.items()})))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / temp_name(key)
        tmp.write_bytes(blob)
        tmp.replace(folder / f"{key}.pkl.z")
    except OSError:  # a read-only cache: the next sweep composes again
        pass


def recall(folder: Path | None, key: str | None) -> tuple[Any, dict[str, Any]] | None:
    """``(task config, choices)`` as :func:`remember` stored them, or None."""
    if folder is None or key is None:
        return None
    try:
        return pickle.loads(zlib.decompress((folder / f"{key}.pkl.z").read_bytes()))
    except (OSError, zlib.error, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
        return None


def remember_job(task_cfg: Any, hydra: Any) -> None:
    """Remember a launched job's composed config (``hydra``: its HydraConfig), as the sweeper
    would on composing it, so that the first re-run of its sweep composes nothing."""
    try:
        folder = memo_folder(task_cfg.paths.cache_dir)
    except Exception:  # noqa: BLE001 - no paths.cache_dir: no memo
        return
    try:
        key = memo_key(hydra.job.config_name, list(hydra.overrides.task), sources_digest(hydra.runtime.config_sources))
    except OSError:  # a config file that cannot be read: the job's own compose decides
        return
    remember(folder, key, task_cfg, hydra.runtime.choices)


class JobConfigs:
    """The resolved configs of a sweep's jobs, composed by Hydra or recalled from the memo.

    ``master`` is the sweep's own config (with its ``hydra`` node), ``loader`` Hydra's config
    loader. :meth:`resolved` gives a job's task config, resolved in the sweep's context, and
    the Hydra node its ``${hydra:...}`` values are read from set for the duration of the call."""

    def __init__(self, loader: Any, master: Any) -> None:
        self.loader, self.master = loader, master
        self.name = master.hydra.job.config_name
        try:
            self.digest = sources_digest(master.hydra.runtime.config_sources)
            self.folder = memo_folder(master.paths.cache_dir)
        except Exception:  # noqa: BLE001 - an unreadable config file, no paths.cache_dir: no memo
            self.digest, self.folder = "", None
        self.composed = self.recalled = 0
        self._node: Any = None

    def task_config(self, overrides: Sequence[str]) -> Any:
        """The job's task config (unresolved), with HydraConfig set to the job's Hydra node
        (restore it afterwards); composed and remembered on a memo miss."""
        import copy

        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf, open_dict, read_write

        key = memo_key(self.name, overrides, self.digest)
        if (hit := recall(self.folder, key)) is not None:
            task_cfg, choices = hit
            hc = HydraConfig.instance()
            if self._node is None:  # the sweep's Hydra node, copied once; each job's choices set in it
                hc.set_config(copy.deepcopy(self.master))
                self._node = hc.cfg
            hc.cfg = self._node
            with read_write(self._node.hydra), open_dict(self._node.hydra):
                self._node.hydra.runtime.choices = choices
                self._node.hydra.overrides.task = list(overrides)
            OmegaConf.copy_cache(from_config=self.master, to_config=task_cfg)  # ${now:} as in a compose
            self.recalled += 1
            return task_cfg
        cfg = self.loader.load_sweep_config(self.master, list(overrides))
        HydraConfig.instance().set_config(cfg)
        choices = cfg.hydra.runtime.choices
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        remember(self.folder, key, cfg, choices)
        self.composed += 1
        return cfg
