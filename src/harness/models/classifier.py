"""The classifier wrapper every pipeline stage sees.

A :class:`Classifier` takes images in ``[0, 1]`` (``[N, 3, H, W]``, RGB) and returns logits; the
network's own normalisation happens inside it. Attributions, perturbations and overlays therefore
all live in plain pixel space, whatever the network expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Classifier(nn.Module):
    """A network plus the preprocessing that turns dataset images into its input.

    Args:
        net: module mapping normalised ``[N, 3, H, W]`` tensors to logits.
        input_size: side of the square input the network takes.
        mean, std: per-channel normalisation applied inside ``forward``.
        resize: resize the shorter image side to this before the centre crop (``None``: resize
            straight to ``input_size`` when the image has another size). Sizes and crop offsets
            are computed as torchvision's ``Resize(resize)`` and ``CenterCrop(input_size)`` do.
        interpolation: ``bilinear``, ``bicubic``, ``nearest`` or ``lanczos`` for the image.
        keep_aspect: ``resize`` sets the shorter side (torchvision's ``Resize(int)``); ``False``:
            both sides (a square ``resize x resize``, as Hugging Face processors with ``size:
            {height, width}``), then the centre crop.
        info: facts about the model to log (e.g. held-out accuracy from training).
        sources: where each preprocessing setting came from (``{"input_size": "model.input_size"}``),
            for the log and ``python -m harness.check``.
    """

    INTERPOLATIONS: ClassVar[dict[str, int]] = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                      "lanczos": Image.LANCZOS}

    def __init__(
        self,
        net: nn.Module,
        input_size: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        resize: int | None = None,
        interpolation: str = "bilinear",
        keep_aspect: bool = True,
        info: dict[str, float] | None = None,
        sources: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if interpolation not in self.INTERPOLATIONS:
            from harness.types import HarnessError

            raise HarnessError(f"model.interpolation={interpolation!r} is not valid; valid: "
                               f"{', '.join(self.INTERPOLATIONS)}")
        self.net = net
        self.input_size = int(input_size)
        self.resize = None if resize is None else int(resize)
        self.interpolation = interpolation
        self.keep_aspect = bool(keep_aspect)
        self.info = dict(info or {})
        self.sources = dict(sources or {})
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def _geometry(self, img: Image.Image, resample: int) -> Image.Image:
        s = self.input_size
        if self.resize is None:
            return img if img.size == (s, s) else img.resize((s, s), resample)
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize * long / short) if self.keep_aspect else self.resize  # as torchvision's Resize(int)
        size = (self.resize, new_long) if w <= h else (new_long, self.resize)
        if size != (w, h):
            img = img.resize(size, resample)
        w, h = img.size
        if w < s or h < s:  # as CenterCrop: pad (black) to the crop size first
            canvas = Image.new(img.mode, (max(w, s), max(h, s)))
            canvas.paste(img, ((max(w, s) - w) // 2, (max(h, s) - h) // 2))
            img, (w, h) = canvas, canvas.size
        left, top = round((w - s) / 2.0), round((h - s) / 2.0)  # as CenterCrop (ties to even)
        return img.crop((left, top, left + s, top + s))

    def describe(self) -> str:
        """The preprocessing, one line, each setting grouped with where it came from."""
        values = {"input_size": self.input_size, "resize": self.resize,
                  "mean": tuple(round(float(v), 4) for v in self.mean.flatten()),
                  "std": tuple(round(float(v), 4) for v in self.std.flatten()), "interpolation": self.interpolation}
        groups: dict[str, list[str]] = {}
        for key, value in values.items():
            groups.setdefault(self.sources.get(key, "given"), []).append(f"{key}={value}")
        return "; ".join(f"{', '.join(parts)} ({source})" for source, parts in groups.items())

    def preprocess(
        self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None] | None = None
    ) -> tuple[torch.Tensor, np.ndarray | None]:
        """uint8 ``[H, W, 3]`` images (and masks) to a ``[N, 3, S, S]`` float tensor in [0, 1].

        Masks follow the same resize and crop (nearest neighbour) and come back as a boolean
        ``[N, S, S]`` array; an image without a mask gets an all-False one.
        """
        out = []
        for im in images:
            pil = self._geometry(Image.fromarray(im).convert("RGB"), self.INTERPOLATIONS[self.interpolation])
            out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1))
        x = torch.stack(out) if out else torch.zeros(0, 3, self.input_size, self.input_size)
        if masks is None:
            return x, None
        m = np.zeros((len(images), self.input_size, self.input_size), dtype=bool)
        for i, mk in enumerate(masks):
            if mk is not None:
                pil = self._geometry(Image.fromarray(mk.astype(np.uint8) * 255), Image.NEAREST)
                m[i] = np.asarray(pil) > 127
        return x, m

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Logits for ``x`` in batches, on the model's device, returned on the CPU."""
        dev = self.mean.device
        outs = [self(x[i : i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(outs) if outs else torch.zeros(0)
