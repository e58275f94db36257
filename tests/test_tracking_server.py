"""Jobs log to a real ``mlflow server`` on 127.0.0.1 exactly as to the embedded store."""

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


@pytest.fixture(scope="module")
def server_sweep(server, cache_dir, trained_vit, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server-sweep")
    r = run_harness("-m", "tracking=server", f"tracking.uri={server}", "dataset.n=4", "xai=random,saliency",
                    "experiment_name=server-test", f"paths.cache_dir={cache_dir}", f"cache.dir={tmp}/stages",
                    f"language.cache_dir={tmp}/answers", f"hydra.sweep.dir={tmp}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_sweep_logs_to_server(server, server_sweep):
    """A 2-job sweep: every run, param, metric and artifact arrives at the server."""
    assert "sweep: 2 jobs: 2 finished" in server_sweep.stdout
    client = MlflowClient(server)
    runs = [x for x in client.search_runs([client.get_experiment_by_name("server-test").experiment_id])
            if "kind" not in x.data.tags]  # not the report run
    assert sorted(x.data.tags["choice.xai"] for x in runs) == ["random", "saliency"]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.metrics["n_images"] == 4
        assert run.data.params["tracking.uri"] == server and run.data.params["dataset.n"] == "4"
        assert {"srg", "srg_ci95_low", "pointing_game", "flesch_reading_ease", "n_answers"} <= set(run.data.metrics)
        files = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"attributions.npz", "per_image.json", "config.yaml", "overlays", "rendered", "answers.jsonl",
                "metric_info.json", "curves.npz"} <= files
        assert len(client.list_artifacts(run.info.run_id, "overlays")) == 4


def test_report_reads_and_logs_to_the_server(server, server_sweep, tmp_path):
    """harness.report on the server's sweep: the same files, and the report run lands there."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "harness.report", "experiments=[server-test]", "tracking=server",
                        f"tracking.uri={server}", f"output_dir={tmp_path}/out", f"hydra.run.dir={tmp_path}/rep"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("faithfulness.csv", "heatmaps.pdf", "curves.png", "figure1.png", "text_metrics.pdf", "report.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    client = MlflowClient(server)
    rep = client.search_runs([client.get_experiment_by_name("server-test").experiment_id], "tags.kind = 'report'")
    assert len(rep) == 1 and "faithfulness.tex" in {f.path for f in client.list_artifacts(rep[0].info.run_id)}
