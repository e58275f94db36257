"""The language stage's backends: tiny transformers VLMs through the real processor and
generate path, the offline verbaliser, and the answer cache."""

import json

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from conftest import run_harness
from harness.mllm.base import Decoding, Request
from harness.mllm.stage import AnswerCache, ask, parse_json
from harness.mllm.transformers_backend import TransformersVLM
from harness.mllm.verbaliser import Verbaliser, mass_grid, region_name
from harness.types import HarnessError
from tiny_vlms import KINDS, build_tiny_vlm
from harness.tracking.mlflow_tracker import run_summary


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {k: build_tiny_vlm(k, root / k) for k in KINDS}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add contention
    yield
    torch.set_num_threads(n)


def requests(n=2):
    rng = np.random.default_rng(0)
    return [Request([Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))],
                    f"Why is this a cat{'?' * (i + 1)}", system="Be brief." if i else None) for i in range(n)]


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_backend_generates_the_requested_length(tiny, kind, one_thread):
    vlm = TransformersVLM(str(tiny[kind]), batch_size=2, local_files_only=True,
                          decoding={"max_new_tokens": 12, "min_new_tokens": 12})
    out = vlm.generate(requests(3))  # a batch of 2 (left-padded) and a batch of 1
    assert [len(a) for a in out] == [1, 1, 1]
    for (a,) in out:
        assert isinstance(a.text, str) and a.completion_tokens == 12 and a.finish_reason == "length"
        assert a.prompt_tokens > 5 and a.latency_s > 0
    alone = vlm.generate(requests(2)[1:])[0][0].text
    assert alone == out[1][0].text  # batching with padding does not change a greedy answer
    sampled = TransformersVLM(str(tiny[kind]), local_files_only=True, decoding={
        "max_new_tokens": 6, "min_new_tokens": 6, "do_sample": True, "num_samples": 3, "seed": 1}).generate(requests(1))
    assert len(sampled[0]) == 3 and all(a.completion_tokens == 6 for a in sampled[0])


def test_missing_hub_model_is_a_clear_error_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(HarnessError, match=r"not in the Hugging Face cache.*huggingface-cli download llava-hf/llava-1.5-7b-hf.*mllm=verbaliser"):
        TransformersVLM("llava-hf/llava-1.5-7b-hf", local_files_only=True)
    with pytest.raises(HarnessError, match="num_samples > 1 needs do_sample"):
        Decoding(num_samples=2)


def test_verbaliser_names_where_the_mass_lies():
    cases = {(0, 0): "upper left", (0, 2): "upper right", (2, 0): "lower left", (2, 2): "lower right",
             (1, 1): "centre", (0, 1): "upper centre", (1, 0): "left side"}
    for (r, c), words in cases.items():
        a = np.zeros((30, 30))
        a[r * 10 + 2 : r * 10 + 8, c * 10 + 2 : c * 10 + 8] = 1.0
        assert region_name(r, c) == words
        text = Verbaliser().describe(Request([], "", attribution=a, label="fox", score=87.4))
        assert f"lies in the {words} of the image" in text and 'predicted "fox" with 87% confidence' in text
        assert f"strongest evidence is in the {words}" in text
    a = np.zeros((30, 30))
    a[:10, :10], a[20:, 20:] = 1.0, 0.8  # two blobs: both named, largest first
    text = Verbaliser(min_share=0.9).describe(Request([], "", attribution=a, label="x"))
    assert "the upper left (56%) and the lower right (44%)" in text
    np.testing.assert_allclose(mass_grid(a).sum(), 1)
    mask = np.zeros((30, 30), bool)
    mask[:10, :10] = True
    on = Verbaliser().describe(Request([], "", attribution=a, label="x", mask=mask))
    assert "56% of the evidence lies on the object" in on
    assert "marks no part" in Verbaliser().describe(Request([], "", attribution=-np.ones((8, 8)), label="x"))


def test_cache_by_content_and_json_answers(tmp_path):
    class Counting(Verbaliser):
        calls = 0

        def generate(self, reqs):
            Counting.calls += len(reqs)
            return super().generate(reqs)

    a = np.zeros((8, 8))
    a[0, 0] = 1
    reqs = [Request([Image.new("RGB", (8, 8), c)], "q", attribution=a, label="x") for c in ("red", "blue")]
    cache = AnswerCache(tmp_path)
    first = ask(Counting(), reqs, ["a", "b"], cache, [["r0.png"], ["r1.png"]])
    again = ask(Counting(), reqs, ["a", "b"], cache, [["r0.png"], ["r1.png"]])
    assert Counting.calls == 2 and [r.cached for r in again] == [True, True] and again[0].text == first[0].text
    changed = Request([Image.new("RGB", (8, 8), "red")], "another question", attribution=a, label="x")
    ask(Counting(), [changed], ["a"], cache, [["r0.png"]])
    assert Counting.calls == 3  # a different prompt misses
    ask(Counting(min_share=0.9), reqs[:1], ["a"], cache, [["r0.png"]])
    assert Counting.calls == 4  # a different backend setting misses
    assert not list(tmp_path.rglob("*.tmp"))
    assert parse_json('Sure! ```json\n{"regions": ["upper left"], "confidence": 0.7}\n``` done') == {
        "regions": ["upper left"], "confidence": 0.7}
    assert parse_json("no json here") is None


def test_language_stage_in_a_run_with_a_tiny_llava(tiny, tmp_path, cache_dir, trained_vit):
    args = ["xai=saliency", "dataset.n=3", "mllm=transformers", f"mllm.model={tiny['llava']}", "render=masked",
            "prompt=structured", "mllm.decoding.max_new_tokens=8", "mllm.decoding.min_new_tokens=8",
            "metrics=[srg]", "resume=false", f"paths.cache_dir={cache_dir}", f"language.cache_dir={tmp_path}/answers",
            f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a"]
    for i in range(2):
        r = run_harness(*args, f"hydra.run.dir={tmp_path}/run{i}")
        assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    first, second = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                       order_by=["attributes.start_time ASC"])
    assert run_summary(first)["n_answers"] == 3 and run_summary(first)["answer_cache_hits"] == 0
    assert run_summary(second)["answer_cache_hits"] == 3  # same combination: nothing asked again
    assert "answer_json_valid" in run_summary(first)
    rid = first.info.run_id
    lines = open(client.download_artifacts(rid, "answers.jsonl", str(tmp_path))).read().splitlines()
    rec = json.loads(lines[0])
    assert rec["backend"] == "transformers" and rec["model"] == str(tiny["llava"])
    assert rec["decoding"]["max_new_tokens"] == 8 and rec["decoding"]["do_sample"] is False
    assert rec["completion_tokens"] == 8 and rec["latency_s"] > 0 and "Answer only with JSON" in rec["prompt"]
    files = {f.path for f in client.list_artifacts(rid, "rendered")}
    assert set(rec["rendered"]) <= files and len(files) == 3
    table = json.load(open(client.download_artifacts(rid, "answers.json", str(tmp_path))))
    assert len(table["data"]) == 3 and "text" in table["columns"]


def test_uncached_hub_model_stops_the_job_with_a_message(tmp_path, cache_dir, trained_vit):
    r = run_harness("mllm=llava15", "dataset.n=2", f"paths.cache_dir={cache_dir}",
                    f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a",
                    f"hydra.run.dir={tmp_path}/run", env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "harness: error: mllm.model='llava-hf/llava-1.5-7b-hf' is not a local folder" in r.stderr
    assert "explain (" not in r.stderr  # refused before any work
