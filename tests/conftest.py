"""Shared fixtures: composed configs, the default shapes ViT (its shipped weights, once per session), paths."""

from __future__ import annotations

import os

# Tests are offline: the hub client reads this once, at import, so set it before anything loads it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from harness import CONF_DIR
from harness.validate import open_keys

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HARNESS_SHARED_DATA", ROOT.parent / "shared" / "data"))
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"real test data not found at {SHARED} (set HARNESS_SHARED_DATA)"
)


def make_cfg(overrides: list[str] = ()):
    """Compose ``conf/`` as ``python -m harness`` would, with ``${hydra:...}`` resolvable."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=open_keys(list(overrides)), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A fresh cache for the session: the shapes ViT's shipped weights are installed here
    (tests/test_trained_model.py trains them again from scratch and compares).

    ``HARNESS_TEST_CACHE=/some/dir`` reuses a cache across sessions (a shortcut while developing).
    """
    reuse = os.environ.get("HARNESS_TEST_CACHE")
    return Path(reuse) if reuse else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def trained_vit(cache_dir):
    from hydra.utils import instantiate

    return instantiate(make_cfg([f"paths.cache_dir={cache_dir}"]).model)


def run_harness(*args: str, env: dict[str, str] | None = None, timeout: int = 600):
    """``python -m harness ARGS`` in a subprocess, as a user runs it."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=timeout)


def pytest_configure(config):
    import torch

    config.stash_torch_threads = torch.get_num_threads()


def pytest_collection_finish(session):
    """A test module that changes torch's thread count when it is imported changes it for every
    test after it (the shipped-weights reproduction among them): refused here, at collection."""
    import torch

    if torch.get_num_threads() != session.config.stash_torch_threads:
        raise pytest.UsageError(f"a test module set torch's thread count to {torch.get_num_threads()} "
                                f"(was {session.config.stash_torch_threads}) when imported; set it inside a test "
                                "and restore it")


def pytest_collection_modifyitems(config, items):
    """The Python-version smoke runs first: at several minutes it is the suite's longest file, so
    under ``-n 2 --dist loadfile`` one worker starts it while the other takes the rest, instead of
    running it alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("pyversions") is None)  # stable: the rest keep their order
