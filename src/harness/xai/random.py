"""Random attribution: the control every comparison table needs."""

from __future__ import annotations

import torch
from torch import nn

from harness.xai.base import Explainer, image_seed


class RandomExplainer(Explainer):
    """Uniform random relevance in [0, 1) per pixel.

    The noise of each image is seeded from ``seed`` and the image's own bytes, so a map does not
    depend on batch composition and the same image always gets the same map.

    Args:
        seed: base seed.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        maps = []
        for img in x.detach().cpu():
            g = torch.Generator().manual_seed(image_seed(self.seed, img))
            maps.append(torch.rand(img.shape[-2:], generator=g))
        return torch.stack(maps)
