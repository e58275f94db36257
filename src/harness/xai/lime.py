"""LIME on superpixels, through the ``lime`` package."""

from __future__ import annotations

from unittest import mock

import numpy as np
import torch
from torch import nn

from harness.types import HarnessError
from harness.utils import rng_restored
from harness.xai.base import Explainer, ModelCost, check_fill, fill_like, image_seed
from harness.xai.superpixels import segment


class Lime(Explainer):
    """LIME: a weighted linear surrogate fitted to the model on random superpixel on/off masks.

    Each pixel gets the surrogate weight of its superpixel for the target class. Model calls go
    in batches of ``batch_size``. Every random draw is seeded per image (from ``seed`` and the
    image bytes): lime's own ``random_state`` and segmentation seed, and the global numpy RNG
    (whose state the caller gets back when :meth:`explain` returns).
    The superpixel mask LIME's paper figure shows (top-k positive superpixels) comes from
    :func:`harness.xai.superpixels.top_k_mask` on the returned map and
    :meth:`segments`.

    References:
        Ribeiro, Singh & Guestrin, "'Why Should I Trust You?': Explaining the Predictions of Any
        Classifier", KDD 2016.

    Args:
        num_samples: perturbed images per explanation.
        segmentation: ``slic``, ``quickshift`` or ``grid`` (see :mod:`harness.xai.superpixels`).
        n_segments, patch: superpixel count for SLIC, cell size for the grid.
        kernel_width: width of lime's exponential similarity kernel.
        hide: fill of switched-off superpixels: ``superpixel_mean`` (lime's default), or
            ``model_mean`` / ``mean`` / a pixel value in [0, 1].
        output: what the surrogate fits: ``softmax`` (lime's usual probabilities) or ``logit``.
        batch_size: images per model call.
        seed: base seed.
    """

    def __init__(self, num_samples: int = 500, segmentation: str = "slic", n_segments: int = 50,
                 patch: int = 4, kernel_width: float = 0.25, hide: float | str = "superpixel_mean",
                 output: str = "softmax", batch_size: int = 256, seed: int = 0) -> None:
        if output not in ("softmax", "logit"):
            raise HarnessError(f"xai.output={output!r} is not valid; valid: softmax, logit")
        self.num_samples = int(num_samples)
        self.segmentation = segmentation
        self.n_segments = int(n_segments)
        self.patch = int(patch)
        self.kernel_width = float(kernel_width)
        self.hide = hide if hide == "superpixel_mean" else check_fill(hide, "xai.hide")
        self.output = output
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        segment(np.zeros((8, 8, 3)), segmentation, n_segments=4, patch=4)  # validate early

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """lime classifies ``num_samples`` perturbed images (the first is the image itself)."""
        return ModelCost(forward=self.num_samples)

    def segments(self, img: np.ndarray) -> np.ndarray:
        """Superpixels of one ``[H, W, 3]`` image in [0, 1], exactly as :meth:`explain` uses them."""
        return segment(img, self.segmentation, n_segments=self.n_segments, patch=self.patch,
                       seed=image_seed(self.seed, img.astype(np.float32)))

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from lime.lime_image import LimeImageExplainer

        dev = x.device

        @torch.no_grad()
        def classify(batch: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device=dev, dtype=torch.float32)
            out = model(t).double()
            return (out.softmax(1) if self.output == "softmax" else out).cpu().numpy()

        maps = []
        with rng_restored():  # lime draws from numpy's global RNG: seed it for this call only
            for img_t, target in zip(x, targets.tolist()):
                img = img_t.permute(1, 2, 0).cpu().numpy().astype(np.float32)
                seed = image_seed(self.seed, img)
                np.random.seed(seed)
                segs = self.segments(img)
                hide = None
                if self.hide != "superpixel_mean":
                    hide = fill_like(model, img_t[None], self.hide, "xai.hide")[0, :, 0, 0].cpu().numpy()
                explainer = LimeImageExplainer(kernel_width=self.kernel_width, random_state=seed)
                # lime 0.2.0.1 draws a progress bar per image with no switch: silence it, scoped.
                with mock.patch("lime.lime_image.tqdm", lambda it, **_: it):
                    exp = explainer.explain_instance(
                        img.astype(np.float64), classify, labels=(target,), top_labels=None, hide_color=hide,
                        num_features=int(segs.max()) + 1, num_samples=self.num_samples,
                        batch_size=self.batch_size, segmentation_fn=lambda _im, s=segs: s, random_seed=seed,
                    )
                weights = np.zeros(int(segs.max()) + 1)
                for sp, wgt in exp.local_exp[target]:
                    weights[sp] = wgt
                maps.append(torch.from_numpy(weights[segs]).float())
        return torch.stack(maps)
