"""ROAD: remove and debias, with noisy linear imputation instead of a constant fill."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from harness.evaluation.base import Metric
from harness.evaluation.perturbation import check_orders
from harness.types import HarnessError, MetricOutput
from harness.xai.base import image_seed, model_device


@contextlib.contextmanager
def _numpy_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG inside the block and restore its state on exit."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


class ROAD(Metric):
    """Remove And Debias (ROAD): is the explained class still predicted once the most (MoRF) or
    least (LeRF) relevant pixels are imputed from their neighbours?

    For each share ``p`` in ``percentages``, the ``int(H*W*p/100)`` top-ranked pixels of the
    map are replaced by Quantus' ``noisy_linear_imputation`` (each removed pixel is the weighted
    mean of its 8 neighbours, solved as one sparse linear system, plus Gaussian noise of std
    ``noise``): imputed values carry no information about the removed shape, which is the bias
    ROAD removes. The curve ``road_<order>`` is 1 where the model still predicts the explained
    class, 0 where not; the score ``road_<order>`` is its mean over the percentages (the area
    under the accuracy curve). MoRF: lower is better; LeRF: higher is better.

    Quantus 0.6.0's ``ROAD`` ranks the map broadcast over the colour channels (``C*H*W``
    features) but imputes pixels (``H*W`` indices), so on a colour image it imputes wrong pixels
    or raises ``IndexError``; here pixels are ranked, and the imputation noise is seeded per
    image (``seed`` and the image's bytes). On one-channel images, with ``noise=0``, our curve
    equals Quantus' (the tests check it).

    References:
        Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution Methods",
        ICML 2022.

    Args:
        percentages: shares of the image (in %) removed, one curve point each.
        noise: standard deviation of the noise added to imputed values (input units, [0, 1]).
        orders: ``[morf]``, ``[lerf]`` or both.
        batch_size: imputed images per model call.
        seed: seeds the imputation noise.
        name: prefix of the logged scores and curves.
    """

    higher_is_better: ClassVar[bool] = False
    family: ClassVar[str] = "faithfulness"

    def __init__(self, percentages: list[float] | tuple[float, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90),
                 noise: float = 0.01, orders: list[str] | tuple[str, ...] = ("morf",), batch_size: int = 128,
                 seed: int = 0, name: str = "road") -> None:
        self.name = str(name)
        self.percentages = np.asarray(list(percentages), dtype=np.float64)
        if not len(self.percentages) or ((self.percentages < 0) | (self.percentages > 100)).any():
            raise HarnessError(f"metrics.{self.name}.percentages must be values in [0, 100], got {list(percentages)}")
        self.orders = check_orders(orders, f"metrics.{self.name}")
        self.noise = float(noise)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def forward_passes(self, image_size: tuple[int, int]) -> int:
        return len(self.orders) * len(self.percentages)

    def impute(self, image: np.ndarray, pixels: np.ndarray, seed: int) -> np.ndarray:
        """``image`` ``[C, H, W]`` with the flat ``pixels`` imputed (Quantus' noisy linear imputation)."""
        from quantus.functions.perturb_func import noisy_linear_imputation

        if not len(pixels):
            return image
        with _numpy_seed(seed):
            return noisy_linear_imputation(arr=image, indices=pixels, noise=self.noise)

    def __call__(self, model: nn.Module, x: torch.Tensor, attributions: np.ndarray | torch.Tensor,
                 targets: torch.Tensor, masks: np.ndarray | None = None) -> MetricOutput:
        a = np.asarray(attributions, dtype=np.float64)
        n, h, w = a.shape
        ks = (h * w * self.percentages / 100).astype(int)
        xs = x.detach().cpu().double().numpy()
        jobs = [(i, o, j) for i in range(n) for o in self.orders for j in range(len(ks))]
        correct = {o: np.zeros((n, len(ks))) for o in self.orders}
        dev = model_device(model)
        for start in range(0, len(jobs), max(1, self.batch_size)):
            chunk = jobs[start : start + self.batch_size]
            imgs = []
            for i, o, j in chunk:
                rank = np.argsort(-a[i].reshape(-1) if o == "morf" else a[i].reshape(-1), kind="stable")
                imgs.append(self.impute(xs[i], rank[: ks[j]], image_seed(self.seed, xs[i]) + j))
            with torch.no_grad():
                pred = model(torch.from_numpy(np.stack(imgs)).to(dev, x.dtype)).argmax(1).cpu().numpy()
            for (i, o, j), p in zip(chunk, pred):
                correct[o][i, j] = float(p == int(targets[i]))
        return MetricOutput(
            scores={f"{self.name}_{o}": c.mean(1) for o, c in correct.items()},
            curves={f"{self.name}_{o}": c for o, c in correct.items()}, curve_x=self.percentages / 100,
            higher_is_better={f"{self.name}_lerf": True})
