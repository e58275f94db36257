"""``python -m harness.report``: the tables and figures of finished sweeps (``conf/report.yaml``)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from harness import CONF_DIR
from harness.types import HarnessError, exit_cleanly

FORMATS = ("png", "pdf", "svg", "eps")


def _figure1_runs(sweep, cfg: DictConfig) -> list[str]:
    from harness.report.load import newest, order_methods

    runs = sweep.runs
    if cfg.figure1.runs:
        ids = []
        for ref in cfg.figure1.runs:
            hit = runs[(runs["run_id"] == str(ref)) | (runs["run_name"] == str(ref))]
            if hit.empty:
                raise HarnessError(f"figure1.runs: no finished run with id or name {ref!r}")
            ids.append(hit["run_id"].iloc[-1])
        return ids
    spoken = newest(runs[runs["mllm"] != "none"], ["xai"])
    ordered = order_methods(list(spoken["xai"]), cfg.methods)
    methods = [m for m in ordered if m != "random"] + [m for m in ordered if m == "random"]  # random last
    return [spoken.loc[spoken["xai"] == m, "run_id"].iloc[-1] for m in methods[: int(cfg.figure1.n_runs)]]


def build_report(sweep, cfg: DictConfig, out: Path) -> tuple[list[Path], list[str], str]:
    """Write every table and figure into ``out``; returns (files, gaps, markdown index)."""
    from harness.report import figures, tables
    from harness.report.load import GROUPS, newest

    files, gaps = [], []
    order = list(cfg.methods) if cfg.methods else None
    fmts, dpi = list(cfg.style.formats), int(cfg.style.dpi)
    runs = sweep.runs
    md = [f"# Report: {', '.join(cfg.experiments)}", "",
          f"{len(runs)} finished runs" + (f" matching `{cfg.filter}`" if cfg.filter else "") +
          f"; methods: {', '.join(sorted(runs['xai'].unique()))}; models: {', '.join(sorted(runs['model'].unique()))}; "
          f"datasets: {', '.join(sorted(runs['dataset'].unique()))}."]
    if (runs["variant"] != "").any():
        md.append("Values swept beyond the options (variants): " + "; ".join(sorted(runs["variant"].unique())) + ".")
    key = ["xai", "model", "dataset", "mllm", "prompt", "render", "variant"]
    if (replaced := len(runs) - len(newest(runs, key))):
        md.append(f"{replaced} run(s) repeat the configuration of a newer run and are left out (the newest is used).")
    md.append("")

    columns = tuple(cfg.table.columns)
    valid = [g for g in (*GROUPS, "variant") if g != "xai"]
    if bad := [c for c in columns if c not in valid]:
        raise HarnessError(f"table.columns has {bad}; valid: {', '.join(valid)}")
    if bad := [f for f in fmts if f not in FORMATS]:
        raise HarnessError(f"style.formats has {bad}; valid: {', '.join(FORMATS)}")
    scores = list(cfg.table.scores) if cfg.table.scores else sweep.scores(list(cfg.table.families))
    if scores:
        table = tables.score_table(runs, sweep.info, scores, "xai", columns, order)
        table.to_csv(out / "faithfulness.csv", index=False)
        text = tables.to_markdown(table, "xai", columns, cfg.table.decimals)
        (out / "faithfulness.md").write_text(text)
        caption = "Mean ± standard error over images; best per column in bold."
        (out / "faithfulness.tex").write_text(tables.to_latex(table, "xai", columns, cfg.table.decimals, caption,
                                                              str(cfg.table.label), bool(cfg.table.wide)))
        files += [out / f"faithfulness.{e}" for e in ("csv", "md", "tex")]
        md += ["## Faithfulness", "", text, caption, ""]
    else:
        gaps.append(f"faithfulness table: no run has a score of the families {list(cfg.table.families)}")
    ranked = sweep.scores(list(cfg.ranking.families))
    if ranked:
        long = tables.score_table(runs, sweep.info, ranked, "xai", columns, order)
        rank = tables.ranking(long, sweep.info, "xai", columns)
        rank.to_csv(out / "ranking.csv", index=False)
        shown = [c for c in rank.columns if c not in ("n_scores",)]
        cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in r] for r in rank[shown].itertuples(index=False)]
        md += ["## Ranking over metrics", "", f"Mean rank (1 = best) per metric family and over families, from "
               f"{len(ranked)} scores ({', '.join(ranked)}); LATEC's aggregation.", "",
               "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown), *("| " + " | ".join(c) + " |" for c in cells), ""]
        files.append(out / "ranking.csv")
        agree = tables.agreement(long, "xai", columns)
        if len(agree) >= 2:
            agree.to_csv(out / "agreement.csv")
            files.append(out / "agreement.csv")
            with figures.paper_style(float(cfg.style.font_size)):
                files += figures.save(figures.agreement_matrix(agree), out, "agreement", fmts, dpi)
            md += ["## Metric agreement", "", "![agreement](agreement.png)", ""]
        else:
            gaps.append("metric agreement: needs at least 2 scores and 3 methods")

    with figures.paper_style(float(cfg.style.font_size)):
        picked = newest(runs, ["xai", "model", "dataset", "variant"])
        groups = list(picked.groupby(["model", "dataset", "variant"], sort=True))
        for k, ((model, dataset, variant), sub) in enumerate(groups, start=1):
            tag = f"_{k}" if len(groups) > 1 else ""
            title = f"{model} on {dataset}" + (f" ({variant})" if variant else "")
            for stem, make in (("heatmaps", lambda s, g: figures.heatmap_grid(
                    sweep, s, int(cfg.heatmaps.n_images), str(cfg.heatmaps.scale), str(cfg.heatmaps.cmap), order, g)),
                    ("curves", lambda s, g: figures.curves(sweep, s, order, g))):
                missing: list[str] = []
                fig = make(sub, missing)
                gaps += [f"{stem} for {title}: {m}" for m in missing]
                if fig is not None:
                    files += figures.save(fig, out, stem + tag, fmts, dpi)
                    md += [f"## {stem.capitalize()}: {title}", "", f"![{stem}]({stem}{tag}.png)", ""]

        fig = figures.figure1(sweep, _figure1_runs(sweep, cfg), int(cfg.figure1.n_images), int(cfg.figure1.max_chars))
        if fig is None:
            gaps.append("figure 1: no chosen run has MLLM answers with rendered images")
        else:
            files += figures.save(fig, out, "figure1", fmts, dpi)
            md += ["## Figure 1", "", "![figure1](figure1.png)", ""]

        text_scores = list(cfg.text.scores) if cfg.text.scores else sweep.scores(list(cfg.text.families))
        spoken = runs[runs["mllm"] != "none"]
        hue = ["mllm", *(g for g in ("prompt", "render", "variant") if spoken[g].nunique() > 1)]
        fig = figures.text_metrics(spoken, text_scores, sweep.info, hue, order) if len(spoken) else None
        if fig is None:
            gaps.append("text metrics: no run has text scores")
        else:
            files += figures.save(fig, out, "text_metrics", fmts, dpi)
            cols = ["xai", *hue]
            picked = newest(spoken, cols)
            keep = [c for s in text_scores for c in (s, f"{s}_ci95_low", f"{s}_ci95_high") if c in picked.columns]
            picked[[*cols, *keep, "run_id"]].to_csv(out / "text_metrics.csv", index=False)
            files.append(out / "text_metrics.csv")
            md += ["## Text metrics", "", "![text metrics](text_metrics.png)", ""]

    files_c, md_c = _concepts(sweep, runs, out)
    files += files_c
    md += md_c
    if len(sweep.summaries):
        s = sweep.summaries.sort_values("start_time")
        keep = [c for c in ("run_name", "source_experiment", "verdict", "sensitivity_statistic", "sensitivity_p_value",
                            "sensitivity_effect_size", "sensitivity_n_groups", "sensitivity_n_answers", "embedding")
                if c in s.columns]
        s[keep].to_csv(out / "sensitivity.csv", index=False)
        files.append(out / "sensitivity.csv")
        cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in s[keep].itertuples(index=False)]
        md += ["## XAI sensitivity", "", "| " + " | ".join(keep) + " |", "|" + "---|" * len(keep),
               *("| " + " | ".join(c) + " |" for c in cells), ""]
        if (png := sweep.artifact(s["run_id"].iloc[-1], "sensitivity.png")) is not None:
            (out / "sensitivity.png").write_bytes(png.read_bytes())
            files.append(out / "sensitivity.png")
            md += ["![sensitivity](sensitivity.png)", ""]
    else:
        gaps.append("XAI sensitivity: no summary run yet (python -m harness.sensitivity source_experiment=...)")
    if gaps:
        md += ["## Not in this report", "", *(f"- {g}" for g in gaps), ""]
    return files, gaps, "\n".join(md)


CONCEPT_SCORES = ("accuracy", "concept_faithfulness", "concept_faithfulness_random", "top_concept_share",
                  "concept_stability_spearman", "concept_stability_top10", "concept_separation", "concepts_in_object",
                  "concepts_in_mark", "concepts_in_background", "prototype_outlier")


def _concepts(sweep, runs, out: Path) -> tuple[list[Path], list[str]]:
    """The concept runs (``xai=crp``): their run-level concept scores, and each one's concept atlas."""
    from harness.report.load import newest

    crp = newest(runs[runs["xai"] == "crp"], ["model", "dataset", "variant"])
    if not len(crp):
        return [], []
    cols = [c for c in CONCEPT_SCORES if c in crp.columns and crp[c].notna().any()]
    head = ["model", "dataset", "variant", *cols]
    md = ["## Concepts", "", "Concept scores of the CRP runs (README, Concepts).", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    files = []
    for k, row in enumerate(crp.itertuples(index=False), start=1):
        r = row._asdict()
        md.append("| " + " | ".join(str(r[c]) if c in ("model", "dataset", "variant") else f"{r[c]:.3g}"
                                    for c in head) + " |")
    md.append("")
    for k, row in enumerate(crp.itertuples(index=False), start=1):
        if (png := sweep.artifact(row.run_id, "concepts/atlas.png")) is not None:
            name = f"concepts_atlas_{k}.png"
            (out / name).write_bytes(png.read_bytes())
            files.append(out / name)
            md += [f"### Concept atlas: {row.model} on {row.dataset}" + (f" ({row.variant})" if row.variant else ""),
                   "", f"![atlas]({name})", ""]
    return files, md


def run(cfg: DictConfig) -> dict[str, Any]:
    from harness.components import build
    from harness.report.load import load

    logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting chatter
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tracker = build(cfg.tracking)
    with tempfile.TemporaryDirectory(prefix="harness-report-") as tmp:
        sweep = load(tracker.client(), list(cfg.experiments), cfg.filter, tmp, ignore=tuple(cfg.variant_ignore))
        files, gaps, index = build_report(sweep, cfg, out)
    (out / "report.md").write_text(index)
    files.append(out / "report.md")
    run_id = None
    if cfg.log_to_mlflow:
        from harness.tracking.mlflow_tracker import flatten

        with tracker.start_run(cfg.run_name, tags={"kind": "report", "source_experiments": ",".join(cfg.experiments),
                                                   "n_source_runs": str(len(sweep.runs))}) as rec:
            rec.params(flatten(OmegaConf.to_container(cfg, resolve=True)))
            for f in files:  # only what this report wrote, not whatever else sits in output_dir
                rec.client.log_artifact(rec.run_id, str(f))
            run_id = rec.run_id
    print(f"report: {len(files)} files from {len(sweep.runs)} runs in {out}"
          + (f" (logged as run {run_id} in experiment {cfg.experiment_name!r})" if run_id else ""))
    for g in gaps:
        print(f"report: not included: {g}")
    return {"files": files, "gaps": gaps, "run_id": run_id, "sweep": sweep}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="report")
def main(cfg: DictConfig) -> None:
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the entry point's choice: one bar per file is noise
    exit_cleanly("harness.report", run, cfg)


if __name__ == "__main__":
    main()
