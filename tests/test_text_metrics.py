"""Text metrics on texts whose answer is known, and the XAI-sensitivity statistic."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness.mllm.base import Record
from harness.mllm.openai_compatible import OpenAICompatible
from harness.text.base import Context
from harness.text.consistency import Consistency, Embedder
from harness.text.grounding import Grounding, mentioned_regions
from harness.text.judge import Judge, mask_label
from harness.text.readability import Readability
from harness.text.sensitivity import sensitivity
from harness.types import HarnessError
from test_openai_compatible import Server
from textstat.textstat import textstatistics


def rec(text, image_id="img0", sample=0):
    return Record(image_id, sample, text, "q", None, "test", "m", {}, 0.0, None, None, None)


def upper_left_map():
    a = np.zeros((30, 30))
    a[:10, :10] = 1.0
    return a


CTX = {"img0": Context("cat", ["cat", "dog", "car"], upper_left_map())}


# Reference texts. Published values: Wikipedia, "Flesch-Kincaid readability tests" (highest reading ease
# 121.22 and lowest grade -3.40, for one-word sentences of one syllable; the platypus sentence: reading
# ease 37.5, grade 11.3); textstat's own tests (SHORT_TEXT and EASY_TEXT: 83.32 / 2.88 and 78.918).
ONE_SYLLABLE = "Go."
PLATYPUS = "The Australian platypus is seemingly a hybrid of a mammal and reptilian creature."
CAT = "The cat sat on the mat."
SHORT = "Cool dogs wear da sunglasses."
EASY = ("Anna and her family love doing puzzles. Anna is best at little puzzles. Anna and her brother work on "
        "medium size puzzles together. Anna's Brother likes puzzles with cars in them. When the whole family does "
        "a puzzle, they do really big puzzles. It can take them a week to finish a really big puzzle. Last year "
        "they did a puzzle with 500 pieces! Anna tries to finish one small puzzle a day by her. Her puzzles have "
        "about 50 pieces. They all glue their favorite puzzles together and frame them. The puzzles look so nice "
        "on the wall.")
JARGON = ("The convolutional classifier backpropagates gradients through activation layers, yielding attribution "
          "heatmaps of superpixel relevance.")
ANSWERS = [CAT, SHORT, EASY, JARGON, "It might be a dog. The map seems to highlight the fur near the centre, which "
           "could possibly mean that the network relied on texture rather than shape. Perhaps the background "
           "also played a small role."]


def test_readability_known_answers():
    r = Readability()
    top = r.scores(ONE_SYLLABLE)
    assert top["flesch_reading_ease"] == pytest.approx(121.22) and top["flesch_kincaid_grade"] == pytest.approx(-3.40)
    short = r.scores(SHORT)
    assert round(short["flesch_reading_ease"], 3) == 83.32 and round(short["flesch_kincaid_grade"], 3) == 2.88
    easy = r.scores(EASY)
    assert round(easy["sentence_words"], 3) == 9.0 and round(easy["word_chars"], 3) == 4.222
    assert easy["flesch_reading_ease"] == pytest.approx(78.918, abs=1e-3)
    platypus = r.scores(PLATYPUS)
    assert platypus["flesch_reading_ease"] == pytest.approx(37.5, abs=0.05)
    assert platypus["flesch_kincaid_grade"] == pytest.approx(11.3, abs=0.05)
    plain = r.scores(CAT)
    assert plain["flesch_reading_ease"] > 90 and plain["flesch_kincaid_grade"] < 1  # very easy
    jargon = r.scores(JARGON)
    assert jargon["flesch_reading_ease"] < plain["flesch_reading_ease"] - 50
    assert jargon["technical_share"] > 0.5 and plain["technical_share"] == 0
    assert r.scores("It might possibly be a cat.")["hedging_share"] == pytest.approx(2 / 6)
    assert np.isnan(r([rec("")], CTX)["flesch_reading_ease"][0])
    assert np.isnan(r([rec("42.")], CTX)["sentence_words"][0])


def test_readability_is_textstat():
    ts = textstatistics()
    ts.set_lang("en_US")
    r = Readability()
    for text in ANSWERS:
        s = r.scores(text)
        assert s["flesch_reading_ease"] == ts.flesch_reading_ease(text)
        assert s["flesch_kincaid_grade"] == ts.flesch_kincaid_grade(text)
        assert s["sentence_words"] == ts.words_per_sentence(text)
        assert s["word_chars"] == ts.avg_letter_per_word(text)
        wps, spw = ts.lexicon_count(text) / ts.sentence_count(text), ts.syllable_count(text) / ts.lexicon_count(text)
        assert s["flesch_reading_ease"] == pytest.approx(206.835 - 1.015 * wps - 84.6 * spw)
        assert s["flesch_kincaid_grade"] == pytest.approx(0.39 * wps + 11.8 * spw - 15.59)
    assert [ts.syllable_count(w) for w in ("cat", "table", "beautiful", "classifier")] == [1, 2, 3, 4]


def test_readability_needs_no_network():
    """The pronouncing dictionary ships with the package: scoring opens no connection."""
    code = ("import socket\n"
            "def refuse(*a, **k): raise AssertionError('readability opened a connection')\n"
            "socket.socket.connect = refuse\n"
            "from harness.text.readability import Readability\n"
            "print(Readability().scores('Nothing here was scored before: the platypus sat on the mat.'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "flesch_reading_ease" in r.stdout, r.stderr[-2000:]


def test_grounding_known_answers():
    g = Grounding()
    good = g([rec("The cat's pointed ears in the upper left are brown.")], CTX)
    assert good["names_class"][0] == 1 and good["spatial_grounding"][0] == 1 and good["unsupported_regions"][0] == 0
    assert good["feature_words"][0] == 3 and good["other_classes"][0] == 0
    bad = g([rec("Two dogs in the lower right corner.")], CTX)
    assert bad["names_class"][0] == 0 and bad["other_classes"][0] == 1
    assert bad["spatial_grounding"][0] == 0 and bad["unsupported_regions"][0] == 1
    assert np.isnan(g([rec("A cat.")], CTX)["spatial_grounding"][0])  # no region named
    assert mentioned_regions("top-left, bottom right, the top, the left side, the middle") == [
        {(0, 0)}, {(2, 2)}, {(0, 0), (0, 1), (0, 2)}, {(0, 0), (1, 0), (2, 0)}, {(1, 1)}]


def test_grounding_points_to_box_known_answers():
    texts = ["Evidence in the upper left.", "Evidence in the lower right.", "Along the top.",
             "Mostly the centre, some in the upper left.", "A cat.", "The left side."]
    corner = Grounding(box=[0, 0, 3, 3])(list(map(rec, texts)), CTX)  # 30 x 30 map: cells of 10 px
    np.testing.assert_allclose(corner["points_to_box"], [1, 0, 1, 1, np.nan, 1])
    # a box across the four middle cells' corners: rows 8-11 and columns 8-11, a quarter in each cell
    mid = Grounding(box=[8, 8, 12, 12])(list(map(rec, texts[:4])), CTX)["points_to_box"]
    np.testing.assert_allclose(mid, [0.25, 0, 0.5, 0.5])
    plain = Grounding()([rec(texts[0])], CTX)
    assert "points_to_box" not in plain and "points_to_box" not in Grounding.directions
    np.testing.assert_array_equal(plain["spatial_grounding"], corner["spatial_grounding"][:1])  # unchanged
    assert Grounding(box=[0, 0, 3, 3]).directions["points_to_box"] is True
    with pytest.raises(HarnessError, match="outside the 30x30 input"):
        Grounding(box=[28, 28, 31, 31])([rec(texts[0])], CTX)
    with pytest.raises(HarnessError, match="box"):
        Grounding(box=[3, 3, 0, 0])


def test_consistency_identical_answers_score_one_with_either_embedding(tmp_path):
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the cat ears are pointed a dog runs fast".split()]
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(str(tmp_path / "tok" / "vocab.txt")).save_pretrained(tmp_path / "bert")
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    word = models.Transformer(str(tmp_path / "bert"))
    SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension())]).save(str(tmp_path / "st"))
    records = [rec("the cat ears are pointed", "a", 0), rec("the cat ears are pointed", "a", 1),
               rec("the cat ears are pointed", "b", 0), rec("a dog runs fast", "b", 1), rec("alone", "c", 0)]
    for model, name in ((str(tmp_path / "st"), "consistency_embedding"), (str(tmp_path / "missing"), "consistency_tfidf")):
        out = Consistency(model=model)(records, {})
        assert list(out) == [name]
        s = out[name]
        assert s[0] == pytest.approx(1.0) and s[2] < 0.99 and np.isnan(s[[1, 3, 4]]).all()
    with pytest.raises(Exception, match="not available"):
        Embedder(str(tmp_path / "missing"), fallback=None)(["x"])


def test_judge_rubric_and_simulatability():
    server = Server()
    try:
        def reply(body, i):
            text = body["messages"][-1]["content"][0]["text"]
            if "Rate the explanation" in text:
                return 'Here you go: {"accuracy": 4, "completeness": 3, "clarity": 5}'
            assert "cat" not in text.split("Options:")[0].lower()  # the label is masked
            return "dog" if "wheels" in text else "cat"

        server.reply = reply
        judge = Judge(OpenAICompatible(server.url, "judge", max_retries=0))
        ctx = {"img0": Context("cat", ["cat", "dog", "car"], upper_left_map(), image=Image.new("RGB", (8, 8)))}
        out = judge([rec("The cat has pointed ears."), rec("Cats have wheels?")], ctx)
        np.testing.assert_array_equal(out["judge_accuracy"], [4, 4])
        np.testing.assert_array_equal(out["judge_clarity"], [5, 5])
        np.testing.assert_array_equal(out["judge_simulatability"], [1, 0])
        rubric_req = next(s for s in server.seen if "Rate" in json.dumps(s["body"]))
        assert any(c["type"] == "image_url" for c in rubric_req["body"]["messages"][-1]["content"])
    finally:
        server.httpd.shutdown()
    assert mask_label("Two Cats and a cat.", "cat") == "Two [class] and a [class]."


def synthetic(differ: bool, n_images=6, samples=3, seed=0):
    """Answers of methods A and B for the same images: about different things when ``differ``."""
    rng = np.random.default_rng(seed)
    topics = {"A": ["ears", "fur", "whiskers", "eyes", "nose"], "B": ["wheels", "windows", "doors", "lights", "roof"]}
    rows = []
    for i in range(n_images):
        for m in ("A", "B"):
            for _ in range(samples):
                pool = topics[m] if differ else topics["A"] + topics["B"]
                rows.append({"image_id": f"i{i}", "method": m,
                             "text": "the marked area shows " + " ".join(rng.choice(pool, 3, replace=False))})
    return pd.DataFrame(rows)


def test_sensitivity_finds_a_difference_by_method_and_none_where_there_is_none():
    emb = Embedder("/nonexistent", fallback="tfidf")
    yes = synthetic(True)
    r = sensitivity(yes, emb(yes["text"].tolist()), ["image_id"], n_permutations=200)
    assert r.p_value < 0.01 and r.statistic > 0.1 and r.effect_size > 1 and r.n_groups == 6
    for seed in range(3):
        no = synthetic(False, seed=seed)
        r0 = sensitivity(no, emb(no["text"].tolist()), ["image_id"], n_permutations=200)
        assert r0.p_value > 0.05 and abs(r0.effect_size) < 0.5
    one_sample = synthetic(True, samples=1)
    with pytest.raises(Exception, match="num_samples > 1"):
        sensitivity(one_sample, emb(one_sample["text"].tolist()), ["image_id"], n_permutations=10)


def test_sensitivity_command_over_a_real_sweep(tmp_path, cache_dir, trained_vit):
    import subprocess
    import sys

    from mlflow import MlflowClient

    from conftest import ROOT, run_harness

    store = [f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a"]
    r = run_harness("-m", "xai=random,saliency", "dataset.n=4", "metrics=[srg]", "mllm.decoding.num_samples=2",
                    "mllm.decoding.do_sample=true", "experiment_name=study", f"paths.cache_dir={cache_dir}",
                    f"language.cache_dir={tmp_path}/answers", f"hydra.sweep.dir={tmp_path}/sweep", *store)
    assert r.returncode == 0, r.stderr[-3000:]
    s = subprocess.run([sys.executable, "-m", "harness.sensitivity", "source_experiment=study", "n_permutations=200",
                        f"hydra.run.dir={tmp_path}/sens", *store], capture_output=True, text=True, cwd=ROOT,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert s.returncode == 0, s.stderr[-3000:]
    assert "XAI sensitivity over 4 groups (16 answers, tfidf)" in s.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = client.get_experiment_by_name("study")
    (summary,) = [run for run in client.search_runs([exp.experiment_id]) if run.data.tags.get("kind") == "summary"]
    m = summary.data.metrics
    # the verbaliser's samples are identical (within = 0) and random vs saliency maps read differently
    assert m["sensitivity_mean_within"] == pytest.approx(0, abs=1e-9) and m["sensitivity_mean_between"] > 0.01
    assert m["sensitivity_p_value"] < 0.05 and summary.data.tags["verdict"] == "sensitive"
    files = {f.path for f in client.list_artifacts(summary.info.run_id)}
    assert {"sensitivity.png", "sensitivity.json", "sensitivity_groups.json"} <= files
    bad = subprocess.run([sys.executable, "-m", "harness.sensitivity", "source_experiment=nope",
                          f"hydra.run.dir={tmp_path}/sens2", *store], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 1 and "source_experiment='nope' does not exist" in bad.stderr


def test_a_model_that_failed_to_load_is_not_retried_by_the_next_job(monkeypatch):
    """Offline without HF_HUB_OFFLINE each attempt costs a minute of retries: one per process is enough."""
    import sentence_transformers

    from harness.text.consistency import Embedder

    calls = []

    def unreachable(*args, **kwargs):
        calls.append(args)
        raise OSError("hub unreachable")

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", unreachable)
    for _ in range(3):
        emb = Embedder("nobody/not-a-model-" + "x" * 8)
        assert emb(["one answer", "another answer"]).shape[0] == 2 and emb.name == "tfidf"
    assert len(calls) == 1


def test_a_model_that_became_loadable_is_tried_again(monkeypatch, tmp_path):
    """The note of failed loads is keyed by the folder's state: once the folder exists, the next
    job loads the model instead of keeping the fallback."""
    import sentence_transformers

    from harness.text.consistency import Embedder

    calls = []

    def load(name, **kwargs):
        calls.append(name)
        if not (tmp_path / "st" / "modules.json").exists():
            raise OSError("not a model folder")
        return type("Model", (), {"encode": lambda self, texts, **kw: np.ones((len(texts), 3))})()

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", load)
    folder = str(tmp_path / "st")
    for _ in range(2):
        emb = Embedder(folder)
        emb(["one answer", "another answer"])
        assert emb.name == "tfidf"
    assert len(calls) == 1
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "modules.json").write_text("[]")
    emb = Embedder(folder)
    assert emb(["one answer", "another answer"]).shape == (2, 3) and emb.name == "embedding" and len(calls) == 2
