"""Perturbation-curve faithfulness: SRG, pixel flipping and region perturbation.

All three remove input regions in the order an attribution ranks them and record the model's
output for the explained class after every step. They share one engine
(:meth:`_Removal.curves`): each perturbed image is built on the fly and every image of every
step goes through the model in batches of ``batch_size``, so a curve of ``K`` steps over ``N``
images costs ``N * K`` forward passes (the steps both orders share are computed once). Regions
are squares of ``patch_size`` pixels on a grid (``patch_size=1``: single pixels), ranked by their
summed relevance; ties keep grid order.

Quantus 0.6.0 implements pixel flipping and region perturbation too; the tests check that our
curves equal Quantus' at equal settings (``tests/test_perturbation_metrics.py``), and
``python -m harness.benchmark mode=metrics`` times both.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.evaluation.base import Metric
from harness.types import HarnessError, MetricOutput
from harness.xai.base import check_fill, fill_like

ORDERS = ("morf", "lerf")


def patch_relevance(attributions: torch.Tensor, patch_size: int, what: str = "metrics.srg") -> torch.Tensor:
    """Sum relevance over non-overlapping ``patch_size`` squares: ``[N, H, W] -> [N, P]``."""
    n, h, w = attributions.shape
    if h % patch_size or w % patch_size:
        raise HarnessError(f"{what}.patch_size={patch_size} does not divide the input size {h}x{w}")
    return F.avg_pool2d(attributions[:, None], patch_size).reshape(n, -1) * patch_size**2


def target_output(logits: torch.Tensor, targets: torch.Tensor, output: str) -> torch.Tensor:
    """The explained class's logit or softmax probability, in float64."""
    logits = logits.double()
    if output == "softmax":
        logits = logits.softmax(1)
    return logits.gather(1, targets[:, None].to(logits.device))[:, 0]


@torch.no_grad()
def outputs(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, output: str,
            batch_size: int) -> np.ndarray:
    """The target output (see :func:`target_output`) for each image, ``batch_size`` at a time."""
    dev = next((p.device for p in model.parameters()), images.device)
    return np.concatenate([
        target_output(model(images[i : i + batch_size].to(dev)), targets[i : i + batch_size], output).cpu().numpy()
        for i in range(0, len(images), max(1, batch_size))
    ]) if len(images) else np.zeros(0)


def check_orders(orders: str | list[str] | tuple[str, ...], what: str) -> tuple[str, ...]:
    """Validate a list of removal orders (``morf``, ``lerf``) when a metric is built."""
    out = tuple(str(o) for o in ([orders] if isinstance(orders, str) else orders))
    if not out or any(o not in ORDERS for o in out) or len(set(out)) < len(out):
        raise HarnessError(f"{what}.orders={list(out)} is not valid; valid: a list of distinct values from {list(ORDERS)}")
    return out


def check_output(output: str, what: str) -> str:
    if output not in ("logit", "softmax"):
        raise HarnessError(f"{what}.output={output!r} is not valid; valid: logit, softmax")
    return output


class _Removal(Metric):
    """Shared settings and the curve engine of the removal metrics (see the module docstring)."""

    family: ClassVar[str] = "faithfulness"
    orders: tuple[str, ...] = ORDERS

    def __init__(self, patch_size: int, replacement: float | str, output: str, batch_size: int,
                 name: str) -> None:
        super().__init__(name)
        self.patch_size = int(patch_size)
        if self.patch_size < 1:
            raise HarnessError(f"metrics.{self.name}.patch_size must be >= 1, got {patch_size}")
        self.replacement = check_fill(replacement, f"metrics.{self.name}.replacement")
        self.output = check_output(output, f"metrics.{self.name}")
        self.curve_y = "target-class probability" if self.output == "softmax" else "target-class logit"
        self.batch_size = int(batch_size)

    def _removed(self, n_patches: int) -> np.ndarray:
        """Patches removed at each curve point, starting with 0."""
        raise NotImplementedError

    def forward_passes(self, image_size: tuple[int, int]) -> int:
        """Images pushed through the model per explained image (for the benchmark)."""
        p = (image_size[0] // self.patch_size) * (image_size[1] // self.patch_size)
        removed = self._removed(p)
        shared = int(removed[0] == 0) + int(removed[-1] == p)
        return len(self.orders) * len(removed) - (len(self.orders) - 1) * shared

    @torch.no_grad()
    def curves(self, model: nn.Module, x: torch.Tensor, attributions: torch.Tensor,
               targets: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Per order, the target output after each step ``[N, K+1]``; and the x-axis ``[K+1]``
        (share of patches removed)."""
        n, _, h, w = x.shape
        rel = patch_relevance(attributions.to(torch.float64), self.patch_size, f"metrics.{self.name}")
        p = rel.shape[1]
        removed = self._removed(p)
        # rank[i, j] = position of patch j in the image's order (stable: ties keep grid order)
        ranks = {o: torch.argsort(torch.argsort(-rel if o == "morf" else rel, dim=1, stable=True), dim=1)
                 for o in self.orders}
        fill = fill_like(model, x, self.replacement, f"metrics.{self.name}.replacement")
        gh, gw = h // self.patch_size, w // self.patch_size
        # Nothing removed and everything removed are the same image in every order: computed once.
        jobs = [(o, s) for o in self.orders for s in range(len(removed))
                if o == self.orders[0] or 0 < removed[s] < p]
        out = {o: torch.empty(len(removed), n, dtype=torch.float64) for o in self.orders}
        dev = x.device
        per_call = max(1, self.batch_size // max(n, 1))
        for start in range(0, len(jobs), per_call):
            chunk = jobs[start : start + per_call]
            imgs = []
            for o, s in chunk:
                keep = (ranks[o] >= removed[s]).to(x.dtype).reshape(n, 1, gh, gw)
                if self.patch_size > 1:
                    keep = keep.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)
                imgs.append(x * keep + fill * (1 - keep))
            vals = target_output(model(torch.cat(imgs).to(dev)), targets.repeat(len(chunk)), self.output).cpu()
            for j, (o, s) in enumerate(chunk):
                out[o][s] = vals[j * n : (j + 1) * n]
        first = self.orders[0]
        for o in self.orders[1:]:
            for s in range(len(removed)):
                if removed[s] in (0, p):
                    out[o][s] = out[first][s]
        return {o: v.T.numpy() for o, v in out.items()}, removed / p


class SRG(_Removal):
    """Symmetric relevance gain (SRG) of an attribution, on the explained class's logit.

    Patches are removed (replaced by a constant) in order of their summed relevance, most
    relevant first (MoRF) and least relevant first (LeRF); the model's output for the target
    class is recorded after every step. The score is the area between the two curves,
    ``AUC(LeRF) - AUC(MoRF)`` with the x-axis (share of patches removed) scaled to [0, 1]:
    large when the attribution ranks the patches the model needs first, zero for an attribution
    that ranks at random, negative for an inverted one.

    References:
        Blücher, Vielhaben & Strodthoff, "Decoupling Pixel Flipping and Occlusion Strategy for
        Consistent XAI Benchmarks", TMLR 2024.
        Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Propagation for Transformers",
        ICML 2024 (Table 1 reports this score on logits).

    Args:
        patch_size: side of the square patches removed together, in input pixels.
        steps: points on each curve after the start (``None``: one per patch).
        replacement: what replaces removed patches: ``"model_mean"`` (the model's normalisation
            mean, i.e. zero in the network's input space: the constant-zero imputer of the
            papers above), ``"mean"`` (each image's per-channel mean), or a constant pixel value
            in [0, 1].
        output: ``logit`` (as in the papers above) or ``softmax`` (the target's probability).
        batch_size: perturbed images per model call.
        name: prefix of the logged scores and curves (``srg``, ``srg_morf_auc``, ...), so that
            variants (e.g. ``srg_softmax``) can be logged side by side.
    """

    def __init__(self, patch_size: int = 4, steps: int | None = 16, replacement: float | str = "model_mean",
                 output: str = "logit", batch_size: int = 128, name: str = "srg") -> None:
        super().__init__(patch_size, replacement, output, batch_size, name)
        self.steps = steps

    def _removed(self, n_patches: int) -> np.ndarray:
        k = n_patches if self.steps is None else min(int(self.steps), n_patches)
        return np.rint(np.linspace(0, n_patches, k + 1)).astype(int)

    def __call__(self, model: nn.Module, x: torch.Tensor, attributions: np.ndarray | torch.Tensor,
                 targets: torch.Tensor, masks: np.ndarray | None = None) -> MetricOutput:
        curves, frac = self.curves(model, x, torch.as_tensor(np.asarray(attributions)), targets)
        morf_auc, lerf_auc = (np.trapezoid(curves[o], frac, axis=1) for o in ORDERS)
        n = self.name
        return MetricOutput(
            scores={n: lerf_auc - morf_auc, f"{n}_morf_auc": morf_auc, f"{n}_lerf_auc": lerf_auc},
            curves={f"{n}_{o}": c for o, c in curves.items()}, curve_x=frac, curve_y=self.curve_y,
            higher_is_better={f"{n}_morf_auc": False, f"{n}_lerf_auc": True})


class PixelFlipping(_Removal):
    """Pixel flipping: the explained class's output as the most relevant pixels are removed.

    Pixels (or ``patch_size`` squares) are replaced in MoRF order, ``steps`` equal shares at a
    time; the score ``pixel_flipping`` is the area under that curve with the x-axis (share of
    the image removed) scaled to [0, 1], so scores compare across image sizes and step counts.
    Lower is better: a faithful attribution makes the output fall fast. The curve is logged as
    ``pixel_flipping_morf``. The output defaults to the softmax probability, as Quantus'
    ``PixelFlipping`` does; our curve at ``steps: null`` equals Quantus' with
    ``features_in_step = channels`` (Quantus has no point for the unperturbed image and no x
    scaling: its AUC is ``sum`` of trapezoids with ``dx=1``).

    References:
        Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by
        Layer-Wise Relevance Propagation", PLoS ONE 10(7), 2015.

    Args:
        patch_size: side of the squares removed together (1: single pixels).
        steps: curve points after the start (``None``: one per pixel or patch).
        replacement: as for :class:`SRG`.
        output: ``softmax`` (Quantus' default) or ``logit``.
        batch_size: perturbed images per model call.
        name: prefix of the logged score and curve.
    """

    higher_is_better: ClassVar[bool] = False
    orders = ("morf",)

    def __init__(self, patch_size: int = 1, steps: int | None = 64, replacement: float | str = "model_mean",
                 output: str = "softmax", batch_size: int = 128, name: str = "pixel_flipping") -> None:
        super().__init__(patch_size, replacement, output, batch_size, name)
        self.steps = steps

    _removed = SRG._removed

    def __call__(self, model: nn.Module, x: torch.Tensor, attributions: np.ndarray | torch.Tensor,
                 targets: torch.Tensor, masks: np.ndarray | None = None) -> MetricOutput:
        curves, frac = self.curves(model, x, torch.as_tensor(np.asarray(attributions)), targets)
        return MetricOutput(scores={self.name: np.trapezoid(curves["morf"], frac, axis=1)},
                            curves={f"{self.name}_morf": curves["morf"]}, curve_x=frac, curve_y=self.curve_y)


class RegionPerturbation(_Removal):
    """Region perturbation: the area over the perturbation curve (AOPC), MoRF and LeRF.

    The ``regions`` most (MoRF) or least (LeRF) relevant ``patch_size`` squares are removed one
    per step. The score per order is Samek et al.'s AOPC,
    ``1/(L+1) * sum_{k=0..L} (f(x) - f(x_k))`` over ``L = regions`` steps: higher is better for
    MoRF (the output falls fast), lower for LeRF. Curves ``region_perturbation_morf`` / ``_lerf``
    hold ``f(x_k)``. Quantus' ``RegionPerturbation`` returns ``f(x) - f(x_k)`` for ``k >= 1``
    and equals ours at equal settings (the tests check it); unlike Quantus we require
    ``patch_size`` to divide the image instead of padding it.

    References:
        Samek et al., "Evaluating the Visualization of What a Deep Neural Network Has Learned",
        IEEE TNNLS 28(11), 2017.

    Args:
        patch_size: side of the removed squares (4 suits the 32 px shapes images; Quantus'
            default 8 suits 224 px).
        regions: regions removed, one per step (Quantus' ``regions_evaluation``, whose default
            is 100; capped at the number of regions in the image).
        orders: which curves to compute: ``[morf, lerf]``, ``[morf]`` or ``[lerf]``.
        replacement: as for :class:`SRG`.
        output: ``softmax`` (Quantus' default) or ``logit``.
        batch_size: perturbed images per model call.
        name: prefix of the logged scores and curves.
    """

    def __init__(self, patch_size: int = 4, regions: int = 32, orders: tuple[str, ...] | list[str] = ORDERS,
                 replacement: float | str = "model_mean", output: str = "softmax", batch_size: int = 128,
                 name: str = "region_perturbation") -> None:
        super().__init__(patch_size, replacement, output, batch_size, name)
        self.regions = int(regions)
        self.orders = check_orders(orders, f"metrics.{self.name}")

    def _removed(self, n_patches: int) -> np.ndarray:
        return np.arange(min(self.regions, n_patches) + 1)

    def __call__(self, model: nn.Module, x: torch.Tensor, attributions: np.ndarray | torch.Tensor,
                 targets: torch.Tensor, masks: np.ndarray | None = None) -> MetricOutput:
        curves, frac = self.curves(model, x, torch.as_tensor(np.asarray(attributions)), targets)
        scores = {f"{self.name}_{o}_aopc": (c[:, :1] - c).mean(1) for o, c in curves.items()}
        return MetricOutput(scores=scores, curves={f"{self.name}_{o}": c for o, c in curves.items()},
                            curve_x=frac, curve_y=self.curve_y, higher_is_better={f"{self.name}_lerf_aopc": False})
