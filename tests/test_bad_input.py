"""Config mistakes: each is one line naming the key, the value and what is expected, found
before torch (or mlflow) is imported, and no run or store is written for a job that never
started."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

BAD = [  # (command line, what the one line must say)
    ("dataset.n=abc", "dataset.n='abc': expected an integer"),
    ("dataset.n=3.5", "dataset.n=3.5: expected an integer"),
    ("dataset.n=-1", "dataset.n=-1: must be at least 1"),
    ("batch_size=abc", "batch_size='abc': expected an integer"),
    ("batch_size=0", "batch_size=0: must be at least 1"),
    ("seed=abc", "seed='abc': expected an integer"),
    ("seed=1.5", "seed=1.5: expected an integer"),
    ("resume=maybe", "resume='maybe': expected true or false"),
    ("resume=1", "resume=1: expected true or false"),
    ("target=truth", "target='truth' is not valid: valid: label, predicted"),
    ("isolation=sometimes", "isolation='sometimes' is not valid: valid: auto, always, never"),
    ("max_overlays=-2", "max_overlays=-2: must be at least 0"),
    ("language.n_images=0", "language.n_images=0: must be at least 1"),
    ("mllm.decoding.num_samples=0", "mllm.decoding.num_samples=0: must be at least 1"),
    ("xai=ig xai.n_steps=abc", "xai.n_steps='abc': expected an integer"),
    ("model.epochs=-1", "model.epochs=-1: must be at least 1"),
    ("tracking.heartbeat_s=0", "tracking.heartbeat_s=0: must be at least 0.001"),
    ("dataset=npz", "dataset.path is mandatory (dataset=npz) and has no value: set dataset.path=..."),
    ("mllm=openai_compatible", "mllm.model is mandatory (mllm=openai_compatible) and has no value"),
    ("dataset.nn=3", "dataset.nn=3: dataset has no key 'nn': did you mean n?"),
    ("mllm.concurency=2 mllm=openai_compatible", "mllm.concurency=2: mllm has no key 'concurency': did you mean concurrency?"),
    ("xai=shapp", "xai=shapp is not an option of xai: did you mean shap?"),
    ("metrics=[srgg]", "metrics=srgg is not an option of metrics: did you mean srg"),
    ("tracking=nope", "tracking=nope is not an option of tracking: valid: local, server"),
    ("experiment=ofline_demo", "experiment=ofline_demo is not an option of experiment: did you mean offline_demo?"),
    ("-m xai=random,shapp", "xai=shapp is not an option of xai: did you mean shap?"),
    ("-m dataset.n=2,abc", "dataset.n='abc': expected an integer"),
    ("-m xai=random,ig dataset.nn=2", "dataset.nn=2: dataset has no key 'nn'"),
    ("-m seed=0,1 batch_size=-4", "batch_size=-4: must be at least 1"),
]


@pytest.mark.parametrize("cmd, says", BAD, ids=[c for c, _ in BAD])
def test_a_config_mistake_is_one_line_before_any_heavy_import(tmp_path, cmd, says):
    store = [f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a",
             f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "harness", *cmd.split(), *store], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=120)
    lines = [x for x in r.stderr.splitlines() if not x.startswith("import time:")]
    imported = {x.split("|")[-1].strip() for x in r.stderr.splitlines() if x.startswith("import time:")}
    assert r.returncode in (1, 2), r.stderr[-2000:]
    assert lines == [lines[0]] and lines[0].startswith("harness: error: ") and says in lines[0], lines
    assert not {"torch", "mlflow", "timm"} & imported  # found before the heavy imports
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "a").exists()  # nothing recorded


def test_a_group_set_to_null_says_how_to_drop_it():
    from harness import CONF_DIR
    from harness.validate import unknown_option

    assert unknown_option(["mllm=null"], CONF_DIR, CONF_DIR.parent / "experiments") == \
        "mllm=null: a config group is dropped with ~mllm, not set to null"
    assert unknown_option(["~mllm", "xai=ig"], CONF_DIR, CONF_DIR.parent / "experiments") is None
