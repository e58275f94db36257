"""shap's Partition explainer (Owen values over a hierarchy of image regions)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from harness.xai.base import Explainer, ModelCost, check_fill, fill_like


class PartitionShap(Explainer):
    """Owen values from ``shap.explainers.Partition`` with ``shap.maskers.Image``.

    shap splits the image recursively into halves and attributes the target logit along that
    hierarchy; a map sums (over pixels and channels) to ``f(x) - f(masked x)``. Images are
    explained one at a time (shap takes one output index per call), each deterministic.

    References:
        Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017;
        the shap package's Partition explainer (Owen values: Owen, "Values of games with a
        priori unions", 1977).

    Args:
        max_evals: model evaluations per image.
        masker: ``model_mean``, ``mean`` or a pixel value (constant fill), or one of shap's
            image masks: ``blur(k,k)``, ``inpaint_telea``, ``inpaint_ns``.
        batch_size: masked images per model call.
    """

    def __init__(self, max_evals: int = 500, masker: float | str = "model_mean", batch_size: int = 256) -> None:
        self.max_evals = int(max_evals)
        shap_masks = isinstance(masker, str) and (masker.startswith("blur(") or masker.startswith("inpaint_"))
        self.masker = masker if shap_masks else check_fill(masker, "xai.masker")
        self.batch_size = int(batch_size)

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """shap evaluates the model on (at most) ``max_evals`` masked images."""
        return ModelCost(forward=self.max_evals)

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import shap

        dev = x.device

        def f(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                t = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).to(dev, torch.float32)
                return model(t).double().cpu().numpy()

        maps = []
        for i, target in enumerate(targets.tolist()):
            img = x[i].permute(1, 2, 0).cpu().numpy().astype(np.float32)
            if isinstance(self.masker, str) and not self.masker.endswith("mean"):
                mask_value: str | np.ndarray = self.masker
            else:
                mask_value = fill_like(model, x[i : i + 1], self.masker, "xai.masker")[0].permute(1, 2, 0).cpu().numpy()
            explainer = shap.Explainer(f, shap.maskers.Image(mask_value, img.shape))
            sv = explainer(img[None], max_evals=self.max_evals, batch_size=self.batch_size,
                           outputs=[target], silent=True)
            maps.append(torch.from_numpy(np.asarray(sv.values[0, ..., 0]).sum(-1)).float())
        return torch.stack(maps)
