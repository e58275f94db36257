"""Symmetric relevance gain: the area between the LeRF and MoRF perturbation curves."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.types import HarnessError, MetricOutput
from harness.xai.base import check_fill, fill_like


def patch_relevance(attributions: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Sum relevance over non-overlapping ``patch_size`` squares: ``[N, H, W] -> [N, P]``."""
    n, h, w = attributions.shape
    if h % patch_size or w % patch_size:
        raise HarnessError(
            f"metrics.srg.patch_size={patch_size} does not divide the input size {h}x{w}"
        )
    return F.avg_pool2d(attributions[:, None], patch_size).reshape(n, -1) * patch_size**2


class SRG:
    """Symmetric relevance gain (SRG) of an attribution, on the explained class's logit.

    Patches are removed (replaced by a constant) in order of their summed relevance, most
    relevant first (MoRF) and least relevant first (LeRF); the model's output for the target
    class is recorded after every step. The score is the area between the two curves,
    ``AUC(LeRF) - AUC(MoRF)`` with the x-axis (share of patches removed) scaled to [0, 1]:
    large when the attribution ranks the patches the model needs first, zero for an attribution
    that ranks at random, negative for an inverted one. All perturbed images of a batch go
    through the model in batches of ``batch_size``.

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

    higher_is_better: ClassVar[bool] = True
    family: ClassVar[str] = "faithfulness"
    needs_masks: ClassVar[bool] = False

    def __init__(
        self,
        patch_size: int = 4,
        steps: int | None = 16,
        replacement: float | str = "model_mean",
        output: str = "logit",
        batch_size: int = 512,
        name: str = "srg",
    ) -> None:
        if output not in ("logit", "softmax"):
            raise HarnessError(f"metrics.srg.output={output!r} is not valid; valid: logit, softmax")
        self.patch_size = int(patch_size)
        self.steps = steps
        self.replacement = check_fill(replacement, "metrics.srg.replacement")
        self.output = output
        self.batch_size = int(batch_size)
        self.name = str(name)

    @torch.no_grad()
    def curves(
        self, model: nn.Module, x: torch.Tensor, attributions: torch.Tensor, targets: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MoRF and LeRF curves ``[N, K]`` and their x-axis ``[K]`` (share removed)."""
        n, _, h, w = x.shape
        rel = patch_relevance(attributions.to(torch.float64), self.patch_size)
        p = rel.shape[1]
        k = p if self.steps is None else min(int(self.steps), p)
        removed = np.rint(np.linspace(0, p, k + 1)).astype(int)  # patches removed per step
        # rank[i, j] = position of patch j in the image's MoRF order (stable: ties keep index order)
        morf_rank = torch.argsort(torch.argsort(-rel, dim=1, stable=True), dim=1)
        lerf_rank = torch.argsort(torch.argsort(rel, dim=1, stable=True), dim=1)
        fill = fill_like(model, x, self.replacement, "metrics.srg.replacement")
        gh, gw = h // self.patch_size, w // self.patch_size
        # Steps 0 and k are the same image for both orders: compute them once.
        jobs = [(0, s) for s in range(k + 1)] + [(1, s) for s in range(1, k)]
        out = torch.empty(2, k + 1, n, dtype=torch.float64)
        dev = x.device
        per_call = max(1, self.batch_size // n)
        for start in range(0, len(jobs), per_call):
            chunk = jobs[start : start + per_call]
            imgs = []
            for order, s in chunk:
                rank = morf_rank if order == 0 else lerf_rank
                keep = (rank >= removed[s]).to(x.dtype).reshape(n, 1, gh, gw)
                keep = keep.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)
                imgs.append(x * keep + fill * (1 - keep))
            logits = model(torch.cat(imgs).to(dev)).double()
            if self.output == "softmax":
                logits = logits.softmax(1)
            vals = logits.gather(1, targets.repeat(len(chunk))[:, None].to(dev))[:, 0].cpu()
            for j, (order, s) in enumerate(chunk):
                out[order, s] = vals[j * n : (j + 1) * n]
        out[1, 0], out[1, k] = out[0, 0], out[0, k]
        return out[0].T.numpy(), out[1].T.numpy(), removed / p

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        attributions: np.ndarray | torch.Tensor,
        targets: torch.Tensor,
        masks: np.ndarray | None = None,
    ) -> MetricOutput:
        a = torch.as_tensor(np.asarray(attributions))
        morf, lerf, frac = self.curves(model, x, a, targets)
        morf_auc, lerf_auc = np.trapezoid(morf, frac, axis=1), np.trapezoid(lerf, frac, axis=1)
        return MetricOutput(
            scores={self.name: lerf_auc - morf_auc, f"{self.name}_morf_auc": morf_auc,
                    f"{self.name}_lerf_auc": lerf_auc},
            curves={f"{self.name}_morf": morf, f"{self.name}_lerf": lerf},
            curve_x=frac,
        )
