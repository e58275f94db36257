"""An explainer that leaves a global patch behind (for the process-isolation test only)."""

import torch
import torch.nn.functional as F

from harness.xai.base import Explainer

_original_gelu = F.gelu


class Leaky(Explainer):
    """Halves every GELU output in the process, forever, then returns zero maps."""

    patches_model = True

    def explain(self, model, x, targets):
        F.gelu = lambda t, approximate="none": 0.5 * _original_gelu(t, approximate=approximate)
        return torch.zeros(x.shape[0], *x.shape[-2:])
