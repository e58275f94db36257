"""Jobs log to a real ``mlflow server`` on 127.0.0.1 exactly as to the embedded store."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow import MlflowClient

from conftest import run_harness
from harness.tracking.mlflow_tracker import run_summary


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
        assert run.info.status == "FINISHED" and run_summary(run)["n_images"] == 4
        assert run.data.params["tracking.uri"] == server and run.data.params["dataset.n"] == "4"
        assert {"srg", "srg_ci95_low", "pointing_game", "flesch_reading_ease", "n_answers"} <= set(run_summary(run))
        files = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"attributions.npz", "per_image.json", "config.yaml", "overlays", "rendered", "answers.jsonl",
                "metric_info.json", "curves.npz"} <= files
        assert len(client.list_artifacts(run.info.run_id, "overlays")) == 4


def test_report_reads_and_logs_to_the_server(server, server_sweep, tmp_path):
    """harness.report on the server's sweep: the same files, and the report run lands there."""
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


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# where the browser test leaves its screenshots (the folder is not versioned)
SCREENSHOTS = Path(os.environ.get("HARNESS_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "outputs" / "test-artifacts")) \
    / "mlflow_ui"
CLASSIC = "workflowType=machine_learning"


@contextmanager
def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1920,1080"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no driver download: Debian's
    try:
        yield driver
    finally:
        driver.quit()


def page_showing(driver, texts: list[str], timeout: float = 90) -> str:
    """The page's text once it shows every one of ``texts`` (the UI renders after loading)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    body = lambda: driver.find_element("tag name", "body").text
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda _: all(t in body() for t in texts))
    except TimeoutException:
        missing = [t for t in texts if t not in body()]
        raise AssertionError(f"{driver.current_url} does not show {missing}; it shows:\n{body()[:3000]}") from None
    return body()


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="needs Debian's chromium and chromium-driver (tests/services/install-debian.sh installs them)")
def test_the_ui_compares_the_sweeps_methods(server, server_sweep):
    """The MLflow UI as a user opens it, in headless Chromium: the link the sweep prints shows
    its runs side by side with each score's mean and sem, best first; the compare view lists both
    runs; a run page has the headline metrics only; an overlay shows as an image. Screenshots
    are kept under ``outputs/test-artifacts/mlflow_ui`` (``HARNESS_TEST_ARTIFACTS``)."""
    link = re.search(r"compare in the MLflow UI: (\S+)", server_sweep.stdout)
    assert link and link.group(1).startswith(server), server_sweep.stdout[-2000:]
    client = MlflowClient(server)
    eid = client.get_experiment_by_name("server-test").experiment_id
    runs = {r.data.tags["choice.xai"]: r for r in client.search_runs([eid], "attributes.status = 'FINISHED'")
            if "kind" not in r.data.tags}
    assert sorted(runs) == ["random", "saliency"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with chromium() as driver:
        driver.get(link.group(1))
        best, worst = sorted(runs.values(), key=lambda r: -r.data.metrics["srg"])
        text = page_showing(driver, ["accuracy", "srg_sem", "choice.xai", *(
            repr(r.data.metrics[k]) for r in runs.values() for k in ("srg", "srg_sem"))])
        assert text.index(best.info.run_name) < text.index(worst.info.run_name)  # sorted by srg, best first
        assert "wall_seconds" not in text and "seconds_explain" not in text  # bookkeeping is not a column
        driver.save_screenshot(str(SCREENSHOTS / "sweep_runs_table.png"))

        ids = [r.info.run_id for r in runs.values()]
        driver.get(f"{server}/#/compare-runs?runs={quote(json.dumps(ids))}&experiments={quote(json.dumps([eid]))}&{CLASSIC}")
        page_showing(driver, ["Comparing 2 Runs", *(r.info.run_name for r in runs.values()), "accuracy"])
        driver.save_screenshot(str(SCREENSHOTS / "compare_runs.png"))

        run = runs["saliency"]
        driver.get(f"{server}/#/experiments/{eid}/runs/{run.info.run_id}?{CLASSIC}")
        page_showing(driver, [f"Metrics ({len(run.data.metrics)})", "srg", repr(run.data.metrics["srg"])])
        assert len(run.data.metrics) < 40  # the headline: accuracy and each score's mean and sem
        driver.save_screenshot(str(SCREENSHOTS / "run_page.png"))

        overlay = client.list_artifacts(run.info.run_id, "overlays")[0].path
        driver.get(f"{server}/#/experiments/{eid}/runs/{run.info.run_id}/artifacts/{overlay}?{CLASSIC}")
        page_showing(driver, [overlay.rsplit("/", 1)[-1]])
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(driver, 60).until(lambda d: any(
            (img.get_attribute("src") or "").startswith("blob:") and d.execute_script("return arguments[0].naturalWidth", img) > 0
            for img in d.find_elements("tag name", "img")))  # the PNG itself, decoded by the browser
        driver.save_screenshot(str(SCREENSHOTS / "overlay_artifact.png"))
