"""Score tables in the layout of the AttnLRP paper's Table 1 (Achtibat et al. 2024): methods as
rows, (model, dataset, score) as columns, mean ± standard error over images, the best value of
each column marked. Written as CSV (full precision), Markdown and LaTeX (booktabs)."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from harness.report.load import newest, order_methods


def score_table(runs: pd.DataFrame, info: dict[str, dict], scores: list[str], rows: str = "xai",
                columns: tuple[str, ...] = ("model", "dataset"), order: list[str] | None = None) -> pd.DataFrame:
    """Long table: one line per (column group, score, row) with ``mean``, ``sem``,
    ``n_images``, ``run_id``, ``higher_is_better`` and ``best``. A score a run lacks is NaN;
    the newest run of each (row, column group) is used."""
    keys = [rows, *columns]
    picked = newest(runs, keys)
    out = []
    for score in scores:
        for _, r in picked.iterrows():
            mean = r.get(score, np.nan)
            out.append({**{k: r[k] for k in keys}, "score": score, "mean": mean,
                        "sem": r.get(f"{score}_sem", np.nan), "n_images": r.get("n_images", np.nan),
                        "run_id": r["run_id"], "higher_is_better": bool(info.get(score, {}).get("higher_is_better", True))})
    table = pd.DataFrame(out)
    if table.empty:
        return table
    table["best"] = False
    for _, idx in table.groupby([*columns, "score"], dropna=False).groups.items():
        col = table.loc[idx]
        vals = col["mean"].astype(float)
        if vals.notna().any():
            target = vals.max() if col["higher_is_better"].iloc[0] else vals.min()
            table.loc[idx, "best"] = np.isclose(vals, target, rtol=0, atol=1e-12) & vals.notna()
    methods = order_methods(list(table[rows].unique()), order)
    table[rows] = pd.Categorical(table[rows], methods, ordered=True)
    table["_order"] = table["score"].map({s: i for i, s in enumerate(scores)})  # scores in the order given
    return table.sort_values([*columns, "_order", rows]).drop(columns="_order").reset_index(drop=True)


def fmt(mean: float, sem: float, decimals: int | None = None) -> str:
    """``mean ± sem``; with ``decimals`` None the sem keeps two significant digits and the
    mean is rounded to the same place."""
    if not np.isfinite(mean):
        return "–"
    if decimals is None:
        decimals = min(4, max(0, 1 - math.floor(math.log10(sem)))) if np.isfinite(sem) and sem > 0 else 3
    return f"{mean:.{decimals}f}" + (f" ± {sem:.{decimals}f}" if np.isfinite(sem) else "")


def _grid(table: pd.DataFrame, rows: str, columns: tuple[str, ...], decimals: int | None):
    """(header tuples, column keys, row names, cells, best flags) of the wide layout; levels of
    ``columns`` with one value only are left out of the header."""
    varying = [c for c in columns if table[c].nunique() > 1]
    col_keys = list(dict.fromkeys(tuple(r) for r in table[[*columns, "score"]].itertuples(index=False)))
    arrow = {s: "↑" if h else "↓" for s, h in zip(table["score"], table["higher_is_better"])}
    header = [tuple(str(k[columns.index(c)]) for c in varying) + (f"{k[-1]} {arrow[k[-1]]}",) for k in col_keys]
    names = [str(m) for m in table[rows].cat.categories if m in set(table[rows])]
    lookup = {(str(r[rows]), tuple(r[c] for c in columns) + (r["score"],)): r for _, r in table.iterrows()}
    cells, best = [], []
    for m in names:
        line = [lookup.get((m, k)) for k in col_keys]
        cells.append([fmt(r["mean"], r["sem"], decimals) if r is not None else "–" for r in line])
        best.append([bool(r is not None and r["best"]) for r in line])
    return header, names, cells, best


def to_markdown(table: pd.DataFrame, rows: str = "xai", columns: tuple[str, ...] = ("model", "dataset"),
                decimals: int | None = None) -> str:
    header, names, cells, best = _grid(table, rows, columns, decimals)
    head = ["method", *(" · ".join(h) for h in header)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, line, b in zip(names, cells, best):
        lines.append("| " + " | ".join([m, *(f"**{c}**" if bb else c for c, bb in zip(line, b))]) + " |")
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "_": r"\_", "&": r"\&", "%": r"\%", "#": r"\#", "$": r"\$", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "↑": r"$\uparrow$",
        "↓": r"$\downarrow$", "±": r"$\pm$", "–": "--", "·": r"$\cdot$", "\N{MINUS SIGN}": "$-$"}


def _tex(s: str) -> str:
    s = re.sub(r"(?<![\w.])-(?=\d)", "\N{MINUS SIGN}", s)  # a negative number's sign
    return "".join(_TEX.get(c, c) for c in s)


def to_latex(table: pd.DataFrame, rows: str = "xai", columns: tuple[str, ...] = ("model", "dataset"),
             decimals: int | None = None, caption: str = "", label: str = "tab:faithfulness",
             wide: bool = False) -> str:
    """A booktabs table; header levels that repeat (model, dataset) are spanned with
    ``\\multicolumn``; ``wide`` makes it a ``table*`` across both columns of a two-column paper."""
    header, names, cells, best = _grid(table, rows, columns, decimals)
    levels = len(header[0]) if header else 1
    env = "table*" if wide else "table"
    out = [rf"\begin{{{env}}}[t]", r"\centering", r"\small", r"\begin{tabular}{l" + "c" * len(header) + "}", r"\toprule"]
    for lvl in range(levels):
        spans, i = [], 0
        while i < len(header):
            j = i
            while j < len(header) and header[j][: lvl + 1] == header[i][: lvl + 1]:
                j += 1
            text = _tex(header[i][lvl])
            spans.append(text if j - i == 1 else rf"\multicolumn{{{j - i}}}{{c}}{{{text}}}")
            i = j
        out.append(" & ".join(["method" if lvl == levels - 1 else "", *spans]) + r" \\")
    out.append(r"\midrule")
    for m, line, b in zip(names, cells, best):
        out.append(" & ".join([_tex(m), *(rf"\textbf{{{_tex(c)}}}" if bb else _tex(c) for c, bb in zip(line, b))])
                   + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        out.append(rf"\caption{{{_tex(caption)}}}")
    out += [rf"\label{{{label}}}", rf"\end{{{env}}}"]
    return "\n".join(out) + "\n"


def ranking(table: pd.DataFrame, info: dict[str, dict], rows: str = "xai",
            columns: tuple[str, ...] = ("model", "dataset")) -> pd.DataFrame:
    """Methods ranked over metrics as LATEC does (Klein et al., "Navigating the maze of
    explainable AI", NeurIPS 2024): within each column group (model, dataset) and score, the
    methods are ranked by their mean, 1 = best in the score's direction (ties share the mean
    rank); ranks are averaged within each metric family, then over the families, so a family with
    many scores does not outweigh one with few. One row per method and column group, with the
    mean rank per family, the overall ``mean_rank`` and ``rank`` (1 = best), best first."""
    if table.empty:
        return pd.DataFrame()
    t = table.dropna(subset=["mean"]).copy()
    t["signed"] = np.where(t["higher_is_better"], -t["mean"].astype(float), t["mean"].astype(float))
    t["metric_rank"] = t.groupby([*columns, "score"], dropna=False, observed=True)["signed"].rank(method="average")
    t["family"] = t["score"].map(lambda s: info.get(s, {}).get("family", "other"))
    fam = t.groupby([*columns, rows, "family"], dropna=False, observed=True)["metric_rank"].mean().unstack("family")
    fam.columns = [f"rank_{c}" for c in fam.columns]
    fam["mean_rank"] = fam.mean(axis=1)
    fam["rank"] = fam.groupby(level=list(range(len(columns))), dropna=False)["mean_rank"].rank(method="min")
    fam["n_scores"] = t.groupby([*columns, rows], dropna=False, observed=True)["score"].nunique()
    return fam.reset_index().sort_values([*columns, "rank", rows]).reset_index(drop=True)


def agreement(table: pd.DataFrame, rows: str = "xai", columns: tuple[str, ...] = ("model", "dataset")) -> pd.DataFrame:
    """How far the metrics agree on the order of the methods: Spearman's rank correlation, over
    methods, between every two scores, each signed so that higher is better (1: the two
    scores order the methods the same way, -1: the opposite way). Computed within each column
    group and averaged over the groups (Fisher z would matter only for many groups)."""
    if table.empty:
        return pd.DataFrame()
    t = table.dropna(subset=["mean"]).copy()
    t["signed"] = np.where(t["higher_is_better"], t["mean"].astype(float), -t["mean"].astype(float))
    mats = []
    for _, g in t.groupby(list(columns), dropna=False, observed=True):
        wide = g.pivot_table(index=rows, columns="score", values="signed", observed=True)
        if len(wide) >= 3:
            mats.append(wide.rank().corr(method="pearson", min_periods=3))
    if not mats:
        return pd.DataFrame()
    scores = list(dict.fromkeys(table["score"]))
    return (sum(m.reindex(index=scores, columns=scores) for m in mats) / len(mats)).dropna(how="all").dropna(axis=1, how="all")
