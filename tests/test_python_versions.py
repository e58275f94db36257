"""The project on the newer Pythons it declares (``requires-python >= 3.11``): a smoke subset of
this suite, run in environments synced from the lock for Python 3.12 and 3.13. The lock resolves
other versions there than on 3.11 (zennit 1.0.0 and numpy 2.5 among them), so the subset covers
what those touch: the configs, LRP and CRP against zennit, and the promised sweep end to end."""

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ("3.12", "3.13")
SMOKE = ["tests/test_config.py", "tests/test_lrp.py", "tests/test_crp_reference.py",
         "tests/test_pipeline.py::test_the_promised_command"]


def interpreter(version: str) -> str | None:
    """A CPython ``version`` on this machine: one uv finds (PATH, uv's own), else a pyenv one."""
    uv = shutil.which("uv")
    if uv:
        r = subprocess.run([uv, "python", "find", "--no-python-downloads", version], capture_output=True, text=True,
                           timeout=60, check=False)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    found = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"))
    return found[-1] if found else None


@pytest.mark.pyversions
@pytest.mark.parametrize("version", VERSIONS)
def test_smoke_subset_on_newer_python(version):
    uv = shutil.which("uv")
    python = interpreter(version)
    if uv is None or python is None:
        pytest.skip(f"needs uv and a CPython {version} (on PATH, installed by uv or by pyenv)")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}  # uv run's own environment is 3.11's
    env["UV_PROJECT_ENVIRONMENT"] = str(ROOT / f".venv-{version}")
    r = subprocess.run([uv, "sync", "--frozen", "--python", python], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200, check=False)
    assert r.returncode == 0, f"uv sync for Python {version} failed:\n{r.stderr[-3000:]}"
    exe = Path(env["UV_PROJECT_ENVIRONMENT"]) / "bin" / "python"
    r = subprocess.run([str(exe), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.stdout.strip() == str(tuple(map(int, version.split(".")))), r.stdout + r.stderr
    r = subprocess.run([str(exe), "-m", "pytest", "-q", "-p", "no:cacheprovider", *SMOKE], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800, check=False)
    assert r.returncode == 0, f"the smoke subset failed on Python {version}:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    assert " passed" in r.stdout and " failed" not in r.stdout
