"""A job logs to a real ``mlflow server`` on 127.0.0.1 exactly as to the embedded store."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import run_harness


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp}/server.db", "--artifacts-destination", str(tmp / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not come up on 127.0.0.1 within 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_job_logs_to_server(server, cache_dir, trained_vit, tmp_path):
    r = run_harness("tracking=server", f"tracking.uri={server}", "dataset.n=4", "xai=random",
                    "experiment_name=server-test", f"paths.cache_dir={cache_dir}",
                    f"hydra.run.dir={tmp_path}/out")
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(server)
    (run,) = client.search_runs([client.get_experiment_by_name("server-test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["n_images"] == 4
    assert run.data.params["tracking.uri"] == server
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"attributions.npz", "per_image.json", "config.yaml", "overlays"} <= files
    assert len(client.list_artifacts(run.info.run_id, "overlays")) == 4
