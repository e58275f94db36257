"""Reports, study presets and the notebook, on the offline demo sweep (the README's first command)
run for real into a temporary MLflow store."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import ROOT, make_cfg, run_harness
from harness.report.tables import fmt
from harness.tracking.mlflow_tracker import run_summary

PRESETS = sorted(p.stem for p in (ROOT / "experiments" / "experiment").glob("*.yaml"))
FIGURES = ("heatmaps", "curves", "figure1", "text_metrics")


def run_module(module: str, *args: str, timeout: int = 600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, cache_dir, trained_vit):
    """The offline demo sweep and its sensitivity summary, in a store of their own."""
    tmp = tmp_path_factory.mktemp("demo")
    store = [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts"]
    r = run_harness("-m", "experiment=offline_demo", *store, f"paths.cache_dir={cache_dir}",
                    f"cache.dir={tmp}/stages", f"language.cache_dir={tmp}/answers", f"hydra.sweep.dir={tmp}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sweep: job 5 of 5" in r.stderr and "sweep: 5 jobs: 5 finished" in r.stdout
    r = run_module("harness.sensitivity", "source_experiment=offline_demo", *store, "n_permutations=200",
                   f"hydra.run.dir={tmp}/sens")
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, store


@pytest.fixture(scope="module")
def report(demo):
    tmp, store = demo
    out = tmp / "report"
    r = run_module("harness.report", "experiments=[offline_demo]", *store, f"output_dir={out}",
                   f"hydra.run.dir={tmp}/rep")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout, MlflowClient(f"sqlite:///{tmp}/mlflow.db")


def test_report_writes_every_table_and_figure(report):
    out, stdout, client = report
    assert "not included" not in stdout, stdout
    for stem in FIGURES:
        for ext in ("png", "pdf"):
            f = out / f"{stem}.{ext}"
            assert f.stat().st_size > 5000, f
        assert f"({stem}.png)" in (out / "report.md").read_text()
    assert (out / "figure1.pdf").read_bytes()[:5] == b"%PDF-"
    for name in ("faithfulness.csv", "faithfulness.md", "faithfulness.tex", "text_metrics.csv", "sensitivity.csv",
                 "sensitivity.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    # logged back as a report run, with the same files
    exp = client.get_experiment_by_name("offline_demo")
    rep = client.search_runs([exp.experiment_id], "tags.kind = 'report'")
    assert len(rep) == 1 and rep[0].info.status == "FINISHED" and rep[0].data.tags["n_source_runs"] == "5"
    assert {"faithfulness.tex", "heatmaps.pdf", "figure1.png", "report.md"} <= {
        f.path for f in client.list_artifacts(rep[0].info.run_id)}


def test_table_numbers_are_the_runs_metrics(report):
    out, _, client = report
    table = pd.read_csv(out / "faithfulness.csv")
    exp = client.get_experiment_by_name("offline_demo")
    runs = {r.data.tags["choice.xai"]: r for r in client.search_runs([exp.experiment_id])
            if "kind" not in r.data.tags}
    assert sorted(table["xai"].unique()) == sorted(runs) == ["gradcam", "ig", "random", "saliency", "smoothgrad"]
    assert set(table["score"]) == {"srg", "srg_morf_auc", "srg_lerf_auc"}  # the faithfulness family only
    for row in table.itertuples():
        m = run_summary(runs[row.xai])
        assert row.run_id == runs[row.xai].info.run_id
        assert row.mean == m[row.score] and row.sem == m[f"{row.score}_sem"]
    # best per column: by direction (SRG and LeRF higher, MoRF lower is better)
    for score, best in (("srg", max), ("srg_lerf_auc", max), ("srg_morf_auc", min)):
        col = table[table["score"] == score]
        winner = best(runs, key=lambda x: run_summary(runs[x])[score])
        assert col.loc[col["best"], "xai"].tolist() == [winner]
        m = run_summary(runs[winner])
        line = next(x for x in (out / "faithfulness.md").read_text().splitlines() if x.startswith(f"| {winner} |"))
        assert f"**{fmt(m[score], m[f'{score}_sem'])}**" in line
    tex = (out / "faithfulness.tex").read_text()
    assert tex.count(r"\textbf{") == 3 and r"\toprule" in tex and r"srg $\uparrow$" in tex


def test_heatmap_rows_share_one_scale_and_inputs_are_logged(demo):
    tmp, _ = demo
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("offline_demo")
    run = client.search_runs([exp.experiment_id], "tags.`choice.xai` = 'ig'")[0]
    z = np.load(client.download_artifacts(run.info.run_id, "attributions.npz", str(tmp)))
    assert z["inputs"].shape == (16, 32, 32, 3) and z["inputs"].dtype == np.uint8
    assert list(z["class_names"]) == ["circle", "square", "triangle", "cross"]


def test_missing_metrics_leave_gaps_not_crashes(demo, cache_dir, tmp_path):
    """Runs without faithfulness scores, curves or answers, sweeping a value (dataset.seed) rather
    than an option: the report says what is missing and keeps the two variants apart."""
    tmp, store = demo
    r = run_harness("-m", "xai=random", "dataset.seed=0,1", "metrics=[pointing_game]", "~mllm", "dataset.n=4",
                    "experiment_name=gaps", *store, f"paths.cache_dir={cache_dir}", f"cache.dir={tmp}/stages",
                    f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_module("harness.report", "experiments=[gaps]", *store, f"output_dir={tmp_path}/out", "log_to_mlflow=false",
                   f"hydra.run.dir={tmp_path}/rep")
    assert r.returncode == 0, r.stderr[-3000:]
    for gap in ("faithfulness table", "curves for vit_tiny_shapes on shapes (dataset.seed=0): no run has curves.npz",
                "figure 1", "text metrics", "XAI sensitivity"):
        assert f"report: not included: {gap}" in r.stdout, gap
    assert (tmp_path / "out" / "heatmaps_1.pdf").exists() and (tmp_path / "out" / "heatmaps_2.pdf").exists()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Not in this report" in md and "variants): dataset.seed=0; dataset.seed=1." in md
    r = run_module("harness.report", "experiments=[nonexistent]", *store, f"hydra.run.dir={tmp_path}/rep2")
    assert r.returncode == 1 and "harness.report: error: experiment 'nonexistent' not found" in r.stderr
    assert "gaps" in r.stderr and "Traceback" not in r.stderr
    r = run_module("harness.report", "experiments=[gaps]", "table.columns=[model,seed]", *store,
                   f"hydra.run.dir={tmp_path}/rep3", f"output_dir={tmp_path}/out3")
    assert r.returncode == 1 and "table.columns has ['seed']; valid: model, dataset, mllm" in r.stderr


def test_notebook_executes_on_the_demo_runs(demo, tmp_path):
    """The README's command: ``jupyter nbconvert --execute`` from the locked environment."""
    import nbformat

    path = ROOT / "notebooks" / "reproduce_figures.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), "commit notebooks stripped"
    tmp, _ = demo
    env = {**os.environ, "HARNESS_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "HARNESS_EXPERIMENT": "offline_demo",
           "HARNESS_NOTEBOOK_OUT": str(tmp_path)}
    jupyter = Path(sys.executable).with_name("jupyter")
    r = subprocess.run([str(jupyter), "nbconvert", "--to", "notebook", "--execute", str(path), "--output",
                        str(tmp_path / "executed.ipynb"), "--ExecutePreprocessor.timeout=300"],
                       capture_output=True, text=True, env=env, cwd=path.parent, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "curves.png").stat().st_size > 5000 and (tmp_path / "curves.pdf").exists()
    done = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in done.cells if c.cell_type == "code" for o in c.outputs)
    assert printed.count("over 16 images") == 5


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_and_has_a_readme(name):
    cfg = make_cfg([f"experiment={name}"])
    assert cfg.experiment_name == name
    readme = ROOT / "experiments" / name / "README.md"
    assert readme.is_file(), f"experiments/{name}/README.md is missing"
    text = readme.read_text()
    assert f"experiment={name}" in text and "## Hardware" in text and "## Outputs" in text


def test_help_names_every_preset():
    """The experiment group lives on the search path, which Hydra's group list does not show."""
    header = (ROOT / "conf" / "config.yaml").read_text().split("Study presets (experiment=...):")[1].split("(")[0]
    assert sorted(p.strip() for p in header.split(",")) == PRESETS


def test_presets_are_the_studies_they_say():
    assert set(PRESETS) >= {"siemens_fig1", "attnlrp_table1", "xai_sensitivity", "shortcut", "offline_demo"}
    fig1 = make_cfg(["experiment=siemens_fig1"])
    assert fig1.model.name == "vit_base_patch16_224" and fig1.xai._target_.endswith("Lime")
    assert fig1.render._target_.endswith("Boundaries") and fig1.mllm.model == "llava-hf/llava-1.5-7b-hf"
    table1 = make_cfg(["experiment=attnlrp_table1"])
    assert list(table1.metrics) == ["srg"] and table1.metrics.srg.output == "logit" and table1.get("mllm") is None


def test_a_hub_preset_offline_says_what_to_do(tmp_path):
    """Without the ViT-B/16 weights the study stops before any work, with what to do."""
    r = run_harness("experiment=attnlrp_table1", "dataset=shapes", "dataset.n=1", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                    f"tracking.artifact_location={tmp_path}/a", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "harness: error:" in r.stderr and "checkpoint" in r.stderr


def test_sweep_size_counts_preset_params():
    from harness.tracking.sweep_summary import sweep_size

    assert sweep_size(["experiment=offline_demo"], {"xai": "random,ig,lime"}) == 3
    assert sweep_size(["xai=random,ig"], {"xai": "random,ig,lime", "prompt": "a,b"}) == 4


def _runs(rows):
    base = {"dataset": "shapes", "mllm": "none", "prompt": "paper", "render": "boundaries", "n_images": 8.0}
    return pd.DataFrame([{**base, "run_id": f"r{i}", "start_time": i, **r} for i, r in enumerate(rows)])


def test_table_layout_best_marks_gaps_and_latex():
    from harness.report.tables import score_table, to_latex, to_markdown

    runs = _runs([
        {"xai": "ig", "model": "vit", "srg": 2.0, "srg_sem": 0.5, "pf": 0.2, "pf_sem": 0.01},
        {"xai": "random", "model": "vit", "srg": 0.1, "srg_sem": 0.3, "pf": 0.3, "pf_sem": 0.02},
        {"xai": "lrp", "model": "vit", "srg": np.nan, "pf": 0.1, "pf_sem": 0.01},   # srg missing
        {"xai": "ig", "model": "resnet", "srg": -1.5, "srg_sem": 0.25, "pf": 0.4, "pf_sem": 0.05},
        {"xai": "random", "model": "resnet", "srg": -1.0, "srg_sem": 0.2, "pf": 0.4, "pf_sem": 0.05},  # tie on pf
    ])
    info = {"srg": {"family": "faithfulness", "higher_is_better": True},
            "pf": {"family": "faithfulness", "higher_is_better": False}}
    t = score_table(runs, info, ["srg", "pf"], "xai", ("model", "dataset"))
    best = {(r.model, r.score): sorted(t[(t.model == r.model) & (t.score == r.score) & t.best].xai)
            for r in t.itertuples()}
    assert best == {("vit", "srg"): ["ig"], ("vit", "pf"): ["lrp"], ("resnet", "srg"): ["random"],
                    ("resnet", "pf"): ["ig", "random"]}
    md = to_markdown(t, "xai", ("model", "dataset")).splitlines()
    assert md[0] == "| method | resnet · srg ↑ | resnet · pf ↓ | vit · srg ↑ | vit · pf ↓ |"  # dataset: one value
    assert [line.split(" |")[0] for line in md[2:]] == ["| random", "| ig", "| lrp"]  # random first
    assert md[4] == "| lrp | – | – | – | **0.100 ± 0.010** |"  # lrp has no resnet run, no vit srg
    assert md[3].startswith("| ig | -1.50 ± 0.25 | **0.400 ± 0.050** | **2.00 ± 0.50** |")
    tex = to_latex(t, "xai", ("model", "dataset"))
    assert r"\multicolumn{2}{c}{resnet} & \multicolumn{2}{c}{vit} \\" in tex
    assert r"$-$1.50 $\pm$ 0.25" in tex and r"pf $\downarrow$" in tex and r"\textbf{--}" not in tex


def test_fmt_rounds_to_the_error():
    assert fmt(1.23456, 0.0123) == "1.235 ± 0.012"
    assert fmt(12.3456, 1.5) == "12.3 ± 1.5"
    assert fmt(0.5, 0.0) == "0.500 ± 0.000" and fmt(float("nan"), 0.1) == "–"
    assert fmt(0.5, float("nan")) == "0.500" and fmt(3.14159, 0.1, decimals=1) == "3.1 ± 0.1"


def test_heatmap_grid_one_colour_scale_per_row_and_colour_bars():
    from harness.report import figures

    rng = np.random.default_rng(0)
    ids = np.array(["a", "b", "c"])
    data = {"r0": {"attributions": rng.normal(size=(3, 8, 8)) * 100, "image_ids": ids,
                   "inputs": np.zeros((3, 8, 8, 3), np.uint8)},
            "r1": {"attributions": rng.normal(size=(3, 8, 8)) * 0.01, "image_ids": ids}}

    class FakeSweep:
        def npz(self, run_id, path):
            return data[run_id]

    runs = _runs([{"xai": "lime", "model": "m"}, {"xai": "ig", "model": "m"}])
    with figures.paper_style():
        for scale in ("row", "map"):
            fig = figures.heatmap_grid(FakeSweep(), runs, n_images=2, scale=scale)
            axes = np.array([ax for ax in fig.axes if ax.images]).reshape(2, 3)  # input, ig, lime
            bars = [ax for ax in fig.axes if not ax.images]
            assert len(bars) == (1 if scale == "map" else 2)  # [-1, 1] everywhere: one bar; raw: one per row
            for r in range(2):
                clims = {axes[r, c].images[0].get_clim() for c in (1, 2)}
                assert len(clims) == 1, clims
                vmax = clims.pop()[1]
                assert vmax == (1.0 if scale == "map" else pytest.approx(np.abs(data["r0"]["attributions"][r]).max()))
                for c, run in ((1, "r1"), (2, "r0")):  # map: each map divided by its own max |value|
                    shown, raw = axes[r, c].images[0].get_array(), data[run]["attributions"][r]
                    np.testing.assert_allclose(shown, raw / np.abs(raw).max() if scale == "map" else raw)
            assert [ax.get_title() for ax in axes[0, :3]] == ["input", "ig", "lime"]
            import matplotlib.pyplot as plt

            plt.close(fig)


def test_variants_are_the_values_swept_beyond_the_options():
    from harness.report.load import variants

    choices = pd.DataFrame({"xai": ["ig", "ig", "lime", "lime"], "model": ["vit"] * 4})
    params = pd.DataFrame({"xai.n_steps": ["32", "32", None, None], "xai.num_samples": [None, None, "500", "500"],
                           "seed": ["0", "1", "0", "1"], "run_name": ["a", "b", "c", "d"],
                           "metrics.srg.steps": ["16", "8", "16", "16"]})
    assert variants(params, choices).tolist() == ["seed=0", "seed=1", "seed=0", "seed=1"]  # run_name, metrics. ignored
    assert variants(params.drop(columns="seed"), choices).tolist() == [""] * 4  # option params differ only by choice


def test_ranking_over_metrics_and_their_agreement():
    """LATEC-style mean ranks (within family, then over families) and Spearman agreement, on a
    table whose answer is known."""
    from harness.report.tables import agreement, ranking

    rows = []
    values = {"s1": (True, {"a": 3, "b": 2, "c": 1}), "s2": (False, {"a": 1, "b": 2, "c": 3}),
              "s3": (True, {"a": 1, "b": 3, "c": 2})}
    for score, (hib, by) in values.items():
        for m, v in by.items():
            rows.append({"xai": m, "model": "vit", "dataset": "shapes", "score": score, "mean": float(v), "sem": 0.1,
                         "higher_is_better": hib})
    table = pd.DataFrame(rows)
    info = {"s1": {"family": "faithfulness"}, "s2": {"family": "faithfulness"}, "s3": {"family": "complexity"}}
    r = ranking(table, info).set_index("xai")
    assert r.loc["a", "rank_faithfulness"] == 1 and r.loc["a", "rank_complexity"] == 3
    assert dict(r["mean_rank"]) == {"b": 1.5, "a": 2.0, "c": 2.5} and dict(r["rank"]) == {"b": 1, "a": 2, "c": 3}
    ag = agreement(table)
    assert ag.loc["s1", "s2"] == pytest.approx(1.0)  # both say a > b > c, in their own directions
    assert ag.loc["s1", "s3"] == pytest.approx(-0.5) and ag.loc["s3", "s3"] == pytest.approx(1.0)
