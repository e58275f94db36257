"""Faithfulness correlation: does removing what the attribution marks change the output by as
much as the attribution says?"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from harness.evaluation.base import Metric
from harness.evaluation.perturbation import check_output, outputs
from harness.types import HarnessError, MetricOutput
from harness.xai.base import check_fill, fill_like, image_seed


class FaithfulnessCorrelation(Metric):
    """Pearson correlation between the relevance of random feature subsets and the output drop
    when those features are removed.

    For each image, ``nr_runs`` random subsets of ``subset_size`` features are replaced by the
    ``replacement``; the score is the Pearson correlation, over the runs, between the subset's
    summed attribution and ``f(x) - f(x_perturbed)`` for the explained class. In [-1, 1];
    higher is better; NaN where either side is constant (e.g. a constant map).

    Features are single channel values, as in Quantus' ``FaithfulnessCorrelation`` (the map
    is broadcast over the colour channels, so a pixel's relevance counts once per channel drawn).
    Each image's subsets come from ``seed`` and the image's own bytes (its score does not depend
    on the batch), drawn with ``numpy.random.RandomState.choice``: with
    ``numpy.random.seed(harness.xai.base.image_seed(seed, image))`` Quantus draws the same
    subsets, and the tests check that the scores are equal.

    References:
        Bhatt, Weller & Moura, "Evaluating and Aggregating Feature-based Model Explanations",
        IJCAI 2020.

    Args:
        nr_runs: random subsets per image (Quantus' default 100).
        subset_size: features per subset (Quantus' default 224).
        replacement: as for :class:`~harness.evaluation.perturbation.SRG`.
        output: ``softmax`` (Quantus' default) or ``logit``.
        batch_size: perturbed images per model call.
        seed: seeds the subsets.
        name: the logged score's name.
    """

    family: ClassVar[str] = "faithfulness"

    def __init__(self, nr_runs: int = 100, subset_size: int = 224, replacement: float | str = "model_mean",
                 output: str = "softmax", batch_size: int = 128, seed: int = 0,
                 name: str = "faithfulness_correlation") -> None:
        super().__init__(name)
        self.nr_runs, self.subset_size = int(nr_runs), int(subset_size)
        if self.nr_runs < 2 or self.subset_size < 1:
            raise HarnessError(f"metrics.{self.name}: nr_runs must be >= 2 and subset_size >= 1 "
                               f"(got {nr_runs}, {subset_size})")
        self.replacement = check_fill(replacement, f"metrics.{self.name}.replacement")
        self.output = check_output(output, f"metrics.{self.name}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def forward_passes(self, image_size: tuple[int, int]) -> int:
        return self.nr_runs + 1

    def subsets(self, image: torch.Tensor) -> np.ndarray:
        """The ``[nr_runs, subset_size]`` flat feature indices drawn for one image."""
        n_features = image.numel()
        if self.subset_size > n_features:
            raise HarnessError(f"metrics.{self.name}.subset_size={self.subset_size} exceeds the "
                               f"{n_features} features of an image")
        rs = np.random.RandomState(image_seed(self.seed, image))
        return np.stack([rs.choice(n_features, self.subset_size, replace=False) for _ in range(self.nr_runs)])

    def __call__(self, model: nn.Module, x: torch.Tensor, attributions: np.ndarray | torch.Tensor,
                 targets: torch.Tensor, masks: np.ndarray | None = None) -> MetricOutput:
        a = np.asarray(attributions, dtype=np.float64)
        fill = fill_like(model, x, self.replacement, f"metrics.{self.name}.replacement")
        y = outputs(model, x, targets, self.output, self.batch_size)
        scores = np.full(len(x), np.nan)
        group = max(1, self.batch_size // self.nr_runs)  # images whose perturbed copies share a model call
        rows = torch.arange(self.nr_runs)[:, None]
        for start in range(0, len(x), group):
            members = range(start, min(start + group, len(x)))
            idx = {i: self.subsets(x[i].cpu()) for i in members}
            imgs = []
            for i in members:
                flat = x[i].reshape(1, -1).repeat(self.nr_runs, 1)
                cols = torch.from_numpy(idx[i]).to(x.device)
                flat[rows, cols] = fill[i].reshape(-1)[cols]
                imgs.append(flat.reshape(-1, *x.shape[1:]))
            t = targets[start : members.stop].repeat_interleave(self.nr_runs)
            perturbed = outputs(model, torch.cat(imgs), t, self.output, self.batch_size)
            for j, i in enumerate(members):
                drops = y[i] - perturbed[j * self.nr_runs : (j + 1) * self.nr_runs]
                rel = np.broadcast_to(a[i], x.shape[1:]).reshape(-1)[idx[i]].sum(1)
                if rel.std() > 0 and drops.std() > 0:
                    scores[i] = float(np.corrcoef(rel, drops)[0, 1])
        return MetricOutput(scores={self.name: scores})
