"""A convolutional patch embedding for timm ViTs.

References:
    Xiao et al., "Early Convolutions Help Transformers See Better", NeurIPS 2021.
"""

from __future__ import annotations

import math

from timm.layers import PatchEmbed
from torch import nn


class ConvStemPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` whose single strided projection becomes a small conv stack.

    ``log2(patch_size)`` 3×3 stride-2 convolutions with ReLU (widths doubling from
    ``stem_width``) followed by a 1×1 projection to ``embed_dim``: the token grid is the same as
    the plain patch embedding's, so every ViT tool that reads the grid works unchanged. Pass it to
    timm as ``embed_layer``; it makes small ViTs trained from scratch learn far faster.
    """

    def __init__(self, *args, stem_width: int = 24, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        p = self.patch_size[0]
        n = int(math.log2(p))
        if 2**n != p or self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"the conv stem needs a square power-of-two patch size, got {self.patch_size}")
        in_ch = self.proj.in_channels
        layers: list[nn.Module] = []
        for i in range(n):
            out = stem_width * 2**i
            layers += [nn.Conv2d(in_ch, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            in_ch = out
        layers.append(nn.Conv2d(in_ch, self.proj.out_channels, 1))
        self.proj = nn.Sequential(*layers)
