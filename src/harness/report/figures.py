"""Paper figures from a :class:`~harness.report.load.Sweep`: heatmap grid, the Figure-1 panel,
perturbation curves and text metrics. Sized for a two-column paper (full width 7 in, 8 pt
text, TrueType fonts embedded in the PDF), colour-blind-safe: the Okabe & Ito (2008) palette
for lines and a ColorBrewer diverging map (Harrower & Brewer 2003) for attributions."""

from __future__ import annotations

import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from harness.report.load import Sweep, order_methods

# Okabe & Ito's palette without its yellow, which is too light for lines on white.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#000000")
LINESTYLES = ("-", "--", ":", "-.")
FULL_WIDTH = 7.0  # inches: \textwidth of a two-column paper (a column is about 3.3 in)


@contextmanager
def paper_style(font_size: float = 8, palette: tuple[str, ...] = OKABE_ITO) -> Iterator[None]:
    """Matplotlib's rcParams with paper settings for the block, restored afterwards. The figures
    of this module are plain ``matplotlib.figure.Figure`` objects, not pyplot's: making and
    saving them neither picks nor switches a backend, nor adds to pyplot's figure list (a
    notebook keeps its inline backend and displays a returned figure as usual)."""
    import matplotlib
    from cycler import cycler

    rc = {"font.size": font_size, "axes.titlesize": font_size, "axes.labelsize": font_size,
          "legend.fontsize": font_size - 1, "xtick.labelsize": font_size - 1, "ytick.labelsize": font_size - 1,
          "pdf.fonttype": 42, "ps.fonttype": 42, "axes.prop_cycle": cycler(color=list(palette)),
          "axes.spines.top": False, "axes.spines.right": False, "savefig.bbox": "tight", "savefig.pad_inches": 0.02}
    with matplotlib.rc_context(rc):
        yield


def _figure(figsize: tuple[float, float]) -> Any:
    """A figure outside pyplot (see :func:`paper_style`)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save(fig: Any, folder: Path, stem: str, formats: list[str], dpi: int = 300) -> list[Path]:
    paths = [folder / f"{stem}.{f}" for f in formats]
    for p in paths:
        fig.savefig(p, dpi=dpi)
    return paths


def _bare(ax: Any) -> None:
    """An image panel: no ticks, no frame (the y label stays)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def method_styles(methods: list[str]) -> dict[str, dict[str, str]]:
    """A fixed colour (and, past 6 methods, line style) per method, the same in every panel; the
    ``random`` baseline is black and dashed."""
    colours = OKABE_ITO[:-1]  # black is the baseline's
    others = [m for m in methods if m != "random"]
    styles = {m: {"color": colours[i % len(colours)], "linestyle": LINESTYLES[(i // len(colours)) % len(LINESTYLES)]}
              for i, m in enumerate(others)}
    return {"random": {"color": "#000000", "linestyle": "--"}, **styles} if "random" in methods else styles


def _small() -> float:
    """Font size for colour bars and dense text: 2 pt below the body size, at least 6 pt."""
    import matplotlib

    return max(6.0, float(matplotlib.rcParams["font.size"]) - 2)


def _legend(fig: Any, axes: Any, ncol: int) -> None:
    """One legend for the figure, from every panel's lines (a method missing in one panel stays)."""
    entries: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(lab, h)
    fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=min(len(entries), ncol),
               frameon=False, bbox_to_anchor=(0.5, 1.0))


def _missing(methods: list[str], artifact: str, some: bool) -> str:
    return f"the runs of {', '.join(methods)} have no {artifact}" if some else f"no run has {artifact}"


def _label(s: str) -> str:
    return s.replace("_", " ")


def heatmap_grid(sweep: Sweep, runs: pd.DataFrame, n_images: int = 4, scale: str = "map", cmap: str = "RdBu_r",
                 order: list[str] | None = None, gaps: list[str] | None = None) -> Any | None:
    """Images as rows (the input first), methods as columns, one colour scale per row, symmetric
    around 0. ``scale='map'``: each map is first divided by its own largest |value|, so every
    row's scale is [-1, 1] (one colour bar for the figure) and every method shows its full range
    (methods differ in units by orders of magnitude); ``'row'``: raw values, the scale (and a
    colour bar per row) set by the largest |attribution| of any method on that image (for
    methods in the same units). Only images
    every run explained are shown; NaN pixels are drawn as 0. None when nothing can be drawn;
    what is left out is appended to ``gaps``."""
    if scale not in ("row", "map"):
        from harness.types import HarnessError

        raise HarnessError(f"heatmaps.scale={scale!r} is not valid; valid: row, map")
    gaps = [] if gaps is None else gaps
    maps, inputs, labels, ids, missing = {}, {}, {}, None, []
    for method in order_methods(list(runs["xai"]), order):
        z = sweep.npz(runs.loc[runs["xai"] == method, "run_id"].iloc[-1], "attributions.npz")
        if z is None:
            missing.append(method)
            continue
        run_ids = [str(i) for i in z["image_ids"]]
        maps[method] = {i: np.nan_to_num(m.astype(float)) for i, m in zip(run_ids, z["attributions"])}
        if "inputs" in z:
            inputs.update(zip(run_ids, z["inputs"]))
        if "class_names" in z:
            names = [str(c) for c in z["class_names"]]
            labels.update({i: names[int(y)] if 0 <= int(y) < len(names) else str(y)
                           for i, y in zip(run_ids, z["labels"])})
        ids = run_ids if ids is None else [i for i in ids if i in maps[method]]
    if missing:
        gaps.append(_missing(missing, "attributions.npz", bool(maps)))
    if not maps:
        return None
    if not ids:
        gaps.append("no image was explained by every run (their image ids differ)")
        return None
    ids = ids[:n_images]
    with_input = all(i in inputs for i in ids)
    ncol = len(maps) + with_input
    cell = min(1.2, (FULL_WIDTH - 0.4) / ncol)
    fig = _figure((cell * ncol + 0.4, cell * len(ids) + 0.25))
    grid = fig.add_gridspec(len(ids), ncol + 1, width_ratios=[1] * ncol + [0.07])
    axes = np.array([[fig.add_subplot(grid[r, c]) for c in range(ncol)] for r in range(len(ids))])
    shared = scale == "map"  # every row on [-1, 1]: one colour bar, beside the middle rows
    middle = slice(len(ids) // 4, max(len(ids) // 4 + 1, len(ids) - len(ids) // 4))
    for r, image_id in enumerate(ids):
        vmax = 1.0 if shared else (max(float(np.abs(m[image_id]).max()) for m in maps.values()) or 1.0)
        if with_input:
            axes[r, 0].imshow(inputs[image_id])
        axes[r, 0].set_ylabel(labels.get(image_id, image_id), fontsize=_small())
        for c, (method, m) in enumerate(maps.items(), start=with_input):
            a = m[image_id]
            if scale == "map":
                a = a / (np.abs(a).max() or 1.0)
            im = axes[r, c].imshow(a, cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(_label(method))
        if not shared or r == len(ids) - 1:
            cb = fig.colorbar(im, cax=fig.add_subplot(grid[middle if shared else r, -1]))
            cb.ax.tick_params(labelsize=_small())
            if shared or r == 0:
                cb.set_label("map / max|map|" if shared else "relevance", fontsize=_small())
    if with_input:
        axes[0, 0].set_title("input")
    for ax in axes.flat:
        _bare(ax)
    return fig


def figure1(sweep: Sweep, run_ids: list[str], n_images: int = 2, max_chars: int = 600, wrap: int = 60) -> Any | None:
    """The source paper's Figure 1: the input | what the MLLM saw | the MLLM's answer (cut at
    ``max_chars`` with an ellipsis), one line per (run, image). None when none of the runs has
    answers."""
    from PIL import Image

    lines = []
    for run_id in run_ids:
        run = sweep.runs.set_index("run_id").loc[run_id]
        z = sweep.npz(run_id, "attributions.npz") or {}
        inputs = dict(zip(map(str, z.get("image_ids", [])), z.get("inputs", [])))
        seen = set()
        for a in sweep.answers(run_id):
            if a["image_id"] in seen or len(seen) >= n_images or not a.get("rendered"):
                continue
            seen.add(a["image_id"])
            files = [sweep.artifact(run_id, f) for f in a["rendered"]]
            if any(f is None for f in files):
                continue
            shown = [np.asarray(Image.open(f).convert("RGB")) for f in files]
            lines.append((run, a, inputs.get(a["image_id"]),
                          shown[0] if len(shown) == 1 else np.concatenate(shown, axis=1)))
    if not lines:
        return None
    fig = _figure((FULL_WIDTH, 1.75 * len(lines)))
    axes = fig.subplots(len(lines), 3, squeeze=False, gridspec_kw={"width_ratios": [1, 1, 2.2]})
    for r, (run, a, original, shown) in enumerate(lines):
        if original is not None:
            axes[r, 0].imshow(original)
        else:  # runs logged before attributions.npz kept the inputs
            axes[r, 0].text(0.5, 0.5, "input not logged", ha="center", va="center", fontsize=_small(),
                            transform=axes[r, 0].transAxes)
        axes[r, 1].imshow(shown)
        axes[r, 0].set_ylabel(f"{_label(run['xai'])} · {_label(run['mllm'])}\n{a['image_id']}", fontsize=_small())
        answer = a["text"] if len(a["text"]) <= max_chars else a["text"][:max_chars].rsplit(" ", 1)[0] + " …"
        text = "\n".join(textwrap.fill(p, wrap) for p in answer.splitlines() if p.strip())
        axes[r, 2].text(0, 1, text, va="top", ha="left", fontsize=_small() + 0.5, transform=axes[r, 2].transAxes)
        axes[r, 2].axis("off")
        for ax in axes[r, :2]:
            _bare(ax)
    for ax, title in zip(axes[0], ("input", "what the MLLM saw", "the MLLM's answer")):
        ax.set_title(title)
    return fig


def curves(sweep: Sweep, runs: pd.DataFrame, order: list[str] | None = None,
           gaps: list[str] | None = None) -> Any | None:
    """Perturbation curves, one panel per curve (SRG MoRF/LeRF, pixel flipping, ...), one line
    per method (same colour in every panel): the mean over images ± one standard error. None
    when no run has curves; methods without are appended to ``gaps``."""
    gaps = [] if gaps is None else gaps
    methods = order_methods(list(runs["xai"]), order)
    styles = method_styles(methods)
    panels: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    owners: dict[str, str] = {}  # panel -> the metric whose curve it is
    ylabels: dict[str, str] = {}  # metric -> what its curves measure (MetricOutput.curve_y, in curves.npz)
    missing = []
    for method in methods:
        z = sweep.npz(runs.loc[runs["xai"] == method, "run_id"].iloc[-1], "curves.npz")
        if z is None:
            missing.append(method)
            continue
        xs = {k[:-2]: v for k, v in z.items() if k.endswith("_x")}
        ylabels.update({k[:-2]: str(v) for k, v in z.items() if k.endswith("_y") and v.ndim == 0})
        for key, ys in z.items():
            owner = max((m for m in xs if key.startswith(m)), key=len, default=None)
            if key.endswith("_x") or owner is None or ys.ndim != 2:
                continue
            panels.setdefault(key, {})[method] = (xs[owner], ys)
            owners[key] = owner
    if missing:
        gaps.append(_missing(missing, "curves.npz", bool(panels)))
    if not panels:
        return None
    ncol = min(4, len(panels))
    nrow = -(-len(panels) // ncol)
    fig = _figure((FULL_WIDTH, 1.9 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax, (key, lines) in zip(axes.flat, panels.items()):
        for method, (x, ys) in lines.items():
            ys = ys[np.isfinite(ys).all(1)]
            if not len(ys):
                continue
            mean = ys.mean(0)
            sem = ys.std(0, ddof=1) / np.sqrt(len(ys)) if len(ys) > 1 else np.zeros_like(mean)
            ax.plot(x, mean, label=_label(method), lw=1.2, **styles[method])
            ax.fill_between(x, mean - sem, mean + sem, color=styles[method]["color"], alpha=0.2, lw=0)
        ax.set(title=_label(key), xlabel="share removed")
    labels = [ylabels.get(owners[key], "target-class output") for key in panels]
    for i, (ax, label) in enumerate(zip(axes.flat, labels)):  # where it differs from the panel on the left
        if i % ncol == 0 or label != labels[i - 1]:
            ax.set_ylabel(label)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    _legend(fig, axes, 7)
    fig.tight_layout()
    return fig


def interval(runs: pd.DataFrame, score: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and 95 % interval of ``score`` per run: the bootstrap interval the run logged, else
    ± 1.96 standard errors."""
    mean = runs[score].to_numpy(float)
    sem = runs.get(f"{score}_sem", pd.Series(np.nan, index=runs.index)).to_numpy(float)
    low = runs.get(f"{score}_ci95_low", pd.Series(np.nan, index=runs.index)).to_numpy(float)
    high = runs.get(f"{score}_ci95_high", pd.Series(np.nan, index=runs.index)).to_numpy(float)
    low = np.where(np.isfinite(low), low, mean - 1.96 * sem)
    high = np.where(np.isfinite(high), high, mean + 1.96 * sem)
    return mean, low, high


def text_metrics(runs: pd.DataFrame, scores: list[str], info: dict[str, dict], hue: list[str],
                 order: list[str] | None = None) -> Any | None:
    """One panel per text score: methods on the x-axis, one marker per ``hue`` combination
    (the MLLM, and the prompt or rendering where they vary), 95 % intervals as error bars."""
    runs = runs[runs["mllm"] != "none"]
    scores = [s for s in scores if s in runs.columns and runs[s].notna().any()]
    if runs.empty or not scores:
        return None
    methods = order_methods(list(runs["xai"].unique()), order)
    groups = list(dict.fromkeys(" · ".join(_label(str(v)) for v in row) for row in runs[hue].itertuples(index=False)))
    key = runs[hue].astype(str).agg(" · ".join, axis=1).map(_label)
    ncol = min(4, len(scores))
    nrow = -(-len(scores) // ncol)
    fig = _figure((FULL_WIDTH, 1.8 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    width = 0.8 / len(groups)
    for ax, score in zip(axes.flat, scores):
        for g, name in enumerate(groups):
            sub = runs[key == name].drop_duplicates("xai", keep="last").set_index("xai").reindex(methods)
            mean, low, high = interval(sub.reset_index(), score)
            x = np.arange(len(methods)) - 0.4 + width * (g + 0.5)
            yerr = np.clip([mean - low, high - mean], 0, None)  # an interval need not contain the mean
            ax.errorbar(x, mean, yerr=yerr, fmt="o", ms=3, lw=1, capsize=1.5, label=name)
        arrow = "↑" if info.get(score, {}).get("higher_is_better", True) else "↓"
        ax.set_title(f"{_label(score)} {arrow}")
        ax.set_xticks(range(len(methods)), [_label(m) for m in methods], rotation=45, ha="right")
    for ax in axes.flat[len(scores):]:
        ax.axis("off")
    _legend(fig, axes, 4)
    fig.tight_layout()
    return fig


def agreement_matrix(agree: Any) -> Any:
    """The metrics' rank agreement (:func:`harness.report.tables.agreement`) as a heatmap,
    -1 to 1 on a diverging scale, the value written in each cell."""
    from matplotlib.figure import Figure

    n = len(agree)
    if n < 2:
        return None
    size = 1.0 + 0.55 * n
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.subplots()
    im = ax.imshow(agree.to_numpy(float), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), agree.columns, rotation=45, ha="right")
    ax.set_yticks(range(n), agree.index)
    for i in range(n):
        for j in range(n):
            v = agree.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if abs(v) > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Spearman ρ over methods")
    ax.set_title("Do the metrics rank the methods alike?")
    fig.tight_layout()
    return fig
