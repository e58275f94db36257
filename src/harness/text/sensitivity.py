"""Is the LLM's explanation sensitive to the XAI method? Between- vs within-method distances of
the answers, with a permutation test.

For each group of answers about the same input (same image, classifier, dataset, MLLM, prompt
and rendering), the answers are embedded (:class:`~harness.text.consistency.Embedder`) and
the cosine distance of every pair is computed. ``between`` is the mean distance of pairs from
different XAI methods, ``within`` of pairs from the same method (different samples, so groups
need ``mllm.decoding.num_samples`` > 1 or several runs of a method to have within pairs). The
statistic is ``T = mean over groups of (between - within)``. Its null distribution comes from
shuffling the method labels of the answers within each group (``n_permutations`` times); the
p-value is ``(1 + #{T_perm >= T}) / (1 + n_permutations)``. The effect size is Cohen's d of the
pooled between-pair distances against the within-pair distances.

References:
    Good, "Permutation, Parametric, and Bootstrap Tests of Hypotheses", Springer 2005.
    Cohen, "Statistical Power Analysis for the Behavioral Sciences", 1988.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.types import HarnessError


@dataclass
class SensitivityResult:
    statistic: float
    p_value: float
    effect_size: float
    mean_between: float
    mean_within: float
    n_groups: int
    n_answers: int
    null: np.ndarray = field(repr=False)
    groups: pd.DataFrame = field(repr=False)
    between: np.ndarray = field(repr=False)
    within: np.ndarray = field(repr=False)

    def metrics(self) -> dict[str, float]:
        return {"sensitivity_statistic": self.statistic, "sensitivity_p_value": self.p_value,
                "sensitivity_effect_size": self.effect_size, "sensitivity_mean_between": self.mean_between,
                "sensitivity_mean_within": self.mean_within, "sensitivity_n_groups": float(self.n_groups),
                "sensitivity_n_answers": float(self.n_answers)}


def _group_stat(dist: np.ndarray, methods: np.ndarray) -> tuple[float, float]:
    same = methods[:, None] == methods[None, :]
    iu = np.triu_indices(len(methods), 1)
    s, d = same[iu], dist[iu]
    return float(d[~s].mean()), float(d[s].mean())


def sensitivity(answers: pd.DataFrame, vectors: np.ndarray, group_by: list[str], method: str = "method",
                n_permutations: int = 1000, seed: int = 0) -> SensitivityResult:
    """The statistic over ``answers`` (one row per answer, with ``method`` and the ``group_by``
    columns) whose unit embedding vectors are ``vectors`` (same order). Groups without both a
    between and a within pair are left out."""
    rng = np.random.default_rng(seed)
    answers = answers.reset_index(drop=True)
    groups, rows, betw, with_ = [], [], [], []
    for key, g in answers.groupby(group_by, sort=True, dropna=False):
        m = g[method].to_numpy()
        if len(set(m)) < 2 or len(m) == len(set(m)):
            continue
        idx = g.index.to_numpy()
        dist = 1 - np.clip(vectors[idx] @ vectors[idx].T, -1, 1)
        b, w = _group_stat(dist, m)
        groups.append((dist, m))
        iu = np.triu_indices(len(m), 1)
        same = (m[:, None] == m[None, :])[iu]
        betw.append(dist[iu][~same])
        with_.append(dist[iu][same])
        rows.append({**dict(zip(group_by, key if isinstance(key, tuple) else (key,))), "n_answers": len(m),
                     "n_methods": len(set(m)), "between": b, "within": w, "difference": b - w})
    if not groups:
        raise HarnessError("no group has answers from two XAI methods and two answers from one method: sweep "
                           "several xai options with mllm.decoding.num_samples > 1 (and do_sample: true)")
    stat = float(np.mean([r["difference"] for r in rows]))
    null = np.empty(n_permutations)
    for k in range(n_permutations):
        null[k] = np.mean([np.subtract(*_group_stat(d, rng.permutation(m))) for d, m in groups])
    b_all, w_all = np.concatenate(betw), np.concatenate(with_)
    pooled = np.sqrt(((len(b_all) - 1) * b_all.var(ddof=1) + (len(w_all) - 1) * w_all.var(ddof=1))
                     / max(1, len(b_all) + len(w_all) - 2)) if len(b_all) > 1 and len(w_all) > 1 else 0.0
    effect = float((b_all.mean() - w_all.mean()) / pooled) if pooled > 0 else float("inf") if b_all.mean() > w_all.mean() else 0.0
    return SensitivityResult(stat, float((1 + (null >= stat - 1e-12).sum()) / (1 + n_permutations)), effect,
                             float(b_all.mean()), float(w_all.mean()), len(rows),
                             int(sum(r["n_answers"] for r in rows)), null, pd.DataFrame(rows), b_all, w_all)


def plot(result: SensitivityResult, path) -> None:
    """Left: within- and between-method distances; right: the permutation null and the observed
    statistic."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend and figure list stay as they are

    fig = Figure(figsize=(7.0, 2.8))
    a, b = fig.subplots(1, 2)
    bins = np.linspace(0, max(1e-6, float(max(result.between.max(), result.within.max()))), 30)
    a.hist(result.within, bins=bins, alpha=0.6, label="same method", color="#0072B2", density=True)
    a.hist(result.between, bins=bins, alpha=0.6, label="different methods", color="#D55E00", density=True)
    a.set(xlabel="cosine distance between answers", ylabel="density", title="answer distances")
    a.legend(fontsize=7)
    b.hist(result.null, bins=30, color="#999999", density=True)
    floor = 1 / (len(result.null) + 1)  # the smallest p the permutations can give
    p = f"p ≤ {floor:.2g}" if result.p_value <= floor * (1 + 1e-9) else f"p = {result.p_value:.2g}"
    b.axvline(result.statistic, color="#D55E00", lw=2, label=f"observed ({p})")
    b.set(xlabel="between − within (mean cosine distance)", ylabel="density", title="permutation null")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
