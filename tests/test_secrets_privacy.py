"""Nothing leaks: planted credentials never reach the store, the caches or Hydra's output
folder, and with privacy on no image's pixels (or their hash) are stored or sent off the host."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from conftest import make_cfg, run_harness
from harness.secrets import REDACTED, find, redact_overrides

KEY_ENV = "SOME_SERVICE_API_KEY"
IN_ENV = "sk-planted0env0a1b2c3d4e5f6g7h8"        # a credential held by the environment
IN_OVERRIDE = "sk-proj-planted1override9z8y7x6w5"  # a token pasted on the command line by mistake


def contents(folder: Path) -> list[tuple[Path, bytes]]:
    """Every file under ``folder`` as bytes, archives (npz, zip) also member by member and
    arrays by their raw bytes, PNGs also as decoded pixels."""
    out = []
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        data = p.read_bytes()
        out.append((p, data))
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                out += [(p, np.ascontiguousarray(z[k]).tobytes()) for k in z.files]
        elif zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                out += [(p, z.read(n)) for n in z.namelist()]
        if p.suffix == ".png":
            out.append((p, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tobytes()))
    return out


def hits(folders: list[Path], needles: list[bytes]) -> list[str]:
    return [f"{p}: {n[:16]!r}" for f in folders for p, blob in contents(f) for n in needles if n in blob]


@pytest.mark.parametrize("mode", [[], ["-m"]], ids=["run", "sweep"])
def test_planted_credentials_are_nowhere(tmp_path, cache_dir, trained_vit, mode):
    prompt = f"Why is this a {{label}}? (service key ${{oc.env:{KEY_ENV}}})"
    r = run_harness(*mode, "xai=saliency", "dataset.n=2", "metrics=[srg]", f"language.method_name={IN_OVERRIDE}",
                    f"prompt.template='{prompt}'", f"paths.cache_dir={cache_dir}", f"cache.dir={tmp_path}/stages",
                    f"language.cache_dir={tmp_path}/answers", f"tracking.uri=sqlite:///{tmp_path}/store/m.db",
                    f"tracking.artifact_location={tmp_path}/store/artifacts", f"hydra.run.dir={tmp_path}/run",
                    f"hydra.sweep.dir={tmp_path}/run", env={KEY_ENV: IN_ENV})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "look like a credential" in r.stdout + r.stderr and "mllm.api_key_env" in r.stdout + r.stderr
    assert IN_ENV not in r.stdout + r.stderr and IN_OVERRIDE not in r.stdout + r.stderr
    folders = [tmp_path / "store", tmp_path / "stages", tmp_path / "answers", tmp_path / "run"]
    assert hits(folders, [IN_ENV.encode(), IN_OVERRIDE.encode()]) == []
    assert hits([tmp_path / "run"], [REDACTED.encode()])  # the files are there, redacted


def test_credential_detection():
    env = ["abcdefgh12345678"]
    found = find({"mllm": {"api_key_env": "OPENAI_API_KEY", "api_key": "hunter2hunter2", "model": "m"},
                  "prompt": {"template": "use ghp_abcdefghijklmnopqrstuvwxyz0123 and abcdefgh12345678"},
                  "tracking": {"uri": "http://u:AKIAABCDEFGHIJKLMNOP@h"}, "seed": 0}, env)
    assert set(found) == {"mllm.api_key", "prompt.template", "tracking.uri"}  # not the *_env pointer
    assert redact_overrides(["mllm.api_key=hunter2", "+x.password=p", "mllm.api_key_env=K", "xai=ig",
                             "prompt.template=x sk-abcdefghijklmnopqrstu y", "mllm.decoding.max_new_tokens=64"]) == [
        f"mllm.api_key={REDACTED}", f"+x.password={REDACTED}", "mllm.api_key_env=K", "xai=ig", f"prompt.template=x {REDACTED} y",
        "mllm.decoding.max_new_tokens=64"]  # a number is never a credential


def needles(cache_dir) -> list[bytes]:
    """Pieces of each test image that would show if its pixels were stored: a 16-pixel run of
    its 8-bit pixels, of its float pixels, and SHA-256 digests of both."""
    data = instantiate(make_cfg(["dataset.n=3", f"paths.cache_dir={cache_dir}"]).dataset)
    out = []
    for img in data.images:
        u8 = np.ascontiguousarray(img)
        row = u8[u8.shape[0] // 2, 8:24].tobytes()
        f32 = (u8.astype(np.float32) / 255)[u8.shape[0] // 2, 8:24].tobytes()
        out += [row, f32, hashlib.sha256(u8.tobytes()).hexdigest().encode(),
                hashlib.sha256(u8.tobytes()).digest()]
    return out


@pytest.mark.parametrize("private", [False, True], ids=["privacy-off", "privacy-on"])
def test_with_privacy_no_pixels_are_stored(tmp_path, cache_dir, trained_vit, private):
    """The search can fail: with privacy off the inputs are stored and found."""
    r = run_harness("xai=saliency", "dataset.n=3", "metrics=[srg]", "max_overlays=3", f"privacy.enabled={private}",
                    f"paths.cache_dir={cache_dir}", f"cache.dir={tmp_path}/stages",
                    f"language.cache_dir={tmp_path}/answers", f"tracking.uri=sqlite:///{tmp_path}/store/m.db",
                    f"tracking.artifact_location={tmp_path}/store/artifacts", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 0, r.stderr[-3000:]
    found = hits([tmp_path / "store"], needles(cache_dir))
    assert (found == []) if private else found, found[:5]
    files = {p.name for p in (tmp_path / "store").rglob("*.png")}
    assert (not any(f.endswith(".png") and f[:5].isdigit() for f in files)) if private else files


def test_privacy_refuses_a_remote_endpoint_before_any_work(tmp_path):
    r = run_harness("privacy.enabled=true", "mllm=openai_compatible", "mllm.base_url=http://192.0.2.7:8000/v1",
                    "mllm.model=m", "dataset.n=2", "model=timm", "model.name=resnet18", "model.num_classes=4",
                    "model.input_size=32", "xai=random", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                    f"tracking.artifact_location={tmp_path}/a", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "mllm would send images to 192.0.2.7, which is not loopback" in r.stderr
    assert "privacy.allow_hosts=[192.0.2.7]" in r.stderr


def test_a_short_credential_value_is_redacted_whole():
    from omegaconf import OmegaConf

    from harness.secrets import redacted_config

    cfg, found = redacted_config(OmegaConf.create({"mllm": {"password": "p4", "model": "llava"}}))
    assert found == {"mllm.password": "p4"} and cfg.mllm.password == REDACTED and cfg.mllm.model == "llava"
