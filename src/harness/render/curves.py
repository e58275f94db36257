"""Perturbation curves as a figure: the mean over images of each curve a metric records."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.types import MetricOutput


def plot_curves(results: dict[str, MetricOutput], path: str | Path, title: str = "") -> bool:
    """Draw every metric's curves (mean over images, ± one standard error as a band) against
    its x-axis, one panel per metric, into ``path``. Returns False (and writes nothing) when no
    metric recorded curves."""
    panels = {name: r for name, r in results.items() if r.curves and r.curve_x is not None}
    if not panels:
        return False
    from matplotlib.figure import Figure  # not pyplot: the caller's backend and figure list stay as they are

    fig = Figure(figsize=(4.5 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (name, r) in zip(axes[0], panels.items()):
        for label, curves in r.curves.items():
            ok = np.isfinite(curves).all(1)
            mean = curves[ok].mean(0)
            sem = curves[ok].std(0, ddof=1) / np.sqrt(ok.sum()) if ok.sum() > 1 else np.zeros_like(mean)
            ax.plot(r.curve_x, mean, label=label)
            ax.fill_between(r.curve_x, mean - sem, mean + sem, alpha=0.25)
        ax.set(title=name, xlabel="share of input removed (most / least relevant first)",
               ylabel=f"{r.curve_y or 'score'} (mean ± sem over images)")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True
