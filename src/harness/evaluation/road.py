"""ROAD: remove and debias, with noisy linear imputation instead of a constant fill."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from harness.evaluation.base import Metric
from harness.evaluation.perturbation import check_orders
from harness.types import HarnessError, MetricOutput
from harness.xai.base import image_seed, model_device


# Quantus' noisy_linear_imputation stencil: (row, column) offset and weight, in Quantus' order.
_OFFSETS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12), ((0, -1), 1 / 6),
            ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))


def _system_parts(x: np.ndarray, img: np.ndarray, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal ``[H, W]`` and right-hand sides ``[J, C, H, W]`` of the imputation systems, with
    Quantus' floating-point operations in Quantus' order: diagonal ``1 - (weights of neighbours
    outside the image)``, right-hand side ``sum of weight * value`` over the kept neighbours."""
    _, c, h, w = x.shape
    kept = x[img] * ~removed[:, None]
    rhs = np.zeros((len(img), c, h, w))
    diag = np.ones((h, w))
    for (dr, dc), wt in _OFFSETS:
        dst_r, src_r = (slice(0, h - dr), slice(dr, h)) if dr >= 0 else (slice(-dr, h), slice(0, h + dr))
        dst_c, src_c = (slice(0, w - dc), slice(dc, w)) if dc >= 0 else (slice(-dc, w), slice(0, w + dc))
        rhs[:, :, dst_r, dst_c] += wt * kept[:, :, src_r, src_c]
        outside = np.ones((h, w), dtype=bool)
        outside[dst_r, dst_c] = False
        diag[outside] -= wt
    return diag, rhs


def _impute_kernel(x, img, pixels, offsets, noise, out):  # pragma: no cover - compiled by numba
    """Fill ``out`` ``[J, C, H, W]``: job ``j`` is image ``x[img[j]]`` with the flat pixels
    ``pixels[offsets[j]:offsets[j + 1]]`` imputed, plus ``noise[:, offsets[j]:offsets[j + 1]]``.

    Unknowns are the removed pixels in raster order; the matrix (diagonal ``1 - weights outside
    the image``, ``-weight`` between removed 8-neighbours) is symmetric positive definite, and
    its Cholesky factor fills only the envelope (each row from its first removed neighbour to
    the diagonal: at most ``W + 1`` wide in raster order). One factorisation per job serves all
    channels. Diagonal and right-hand side use Quantus' operations in Quantus' order."""
    jobs, c, h, w = out.shape
    n = h * w
    gid = np.empty(n, np.int64)
    pix = np.empty(n, np.int64)
    first = np.empty(n, np.int64)
    start = np.empty(n + 1, np.int64)
    dinv = np.empty(n)
    b = np.empty((n, c))
    low = np.empty(n * (w + 2))  # envelope rows, strictly lower part
    dr8 = (1, 0, -1, 1, 0, -1, 1, -1)  # _OFFSETS
    dc8 = (1, 1, 1, -1, -1, -1, 0, 0)
    w8 = (1 / 12, 1 / 6, 1 / 12, 1 / 12, 1 / 6, 1 / 12, 1 / 6, 1 / 6)
    for j in range(jobs):
        src = x[img[j]]
        out[j] = src
        gid[:] = -1
        for t in range(offsets[j], offsets[j + 1]):
            gid[pixels[t]] = 0
        m = 0
        for p in range(n):
            if gid[p] == 0:
                gid[p] = m
                pix[m] = p
                m += 1
        start[0] = 0
        for i in range(m):
            r, q = pix[i] // w, pix[i] % w
            f = i
            for dr, dc in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
                if 0 <= r + dr < h and 0 <= q + dc < w:
                    g = gid[(r + dr) * w + q + dc]
                    if 0 <= g < f:
                        f = g
            first[i] = f
            start[i + 1] = start[i] + i - f
        for i in range(m):
            r, q = pix[i] // w, pix[i] % w
            row = start[i] - first[i]
            for k in range(start[i], start[i + 1]):
                low[k] = 0.0
            for ch in range(c):
                b[i, ch] = 0.0
            d = 1.0
            for o in range(8):
                r2, q2 = r + dr8[o], q + dc8[o]
                if 0 <= r2 < h and 0 <= q2 < w:
                    g = gid[r2 * w + q2]
                    if g < 0:
                        for ch in range(c):
                            b[i, ch] += w8[o] * src[ch, r2, q2]
                    elif g < i:
                        low[row + g] = -w8[o]
                else:
                    d -= w8[o]
            dinv[i] = d
        if m == n:  # nothing kept: singular; Quantus' solve gives 0 (b is 0)
            dinv[:m] = 0.0
        else:
            for i in range(m):  # Cholesky, row by row: L[i, k] for k in first[i]..i-1, then L[i, i]
                fi, row = first[i], start[i] - first[i]
                for k in range(fi, i):
                    rowk = start[k] - first[k]
                    acc = low[row + k]
                    for t in range(max(fi, first[k]), k):
                        acc -= low[row + t] * low[rowk + t]
                    low[row + k] = acc * dinv[k]
                acc = dinv[i]
                for t in range(fi, i):
                    acc -= low[row + t] * low[row + t]
                dinv[i] = 1.0 / np.sqrt(acc)
        for i in range(m):  # L y = b
            row = start[i] - first[i]
            if c == 3:  # colour images: three accumulators, one pass over the row
                a0, a1, a2 = b[i, 0], b[i, 1], b[i, 2]
                for t in range(first[i], i):
                    l = low[row + t]
                    a0 -= l * b[t, 0]
                    a1 -= l * b[t, 1]
                    a2 -= l * b[t, 2]
                b[i, 0], b[i, 1], b[i, 2] = a0 * dinv[i], a1 * dinv[i], a2 * dinv[i]
            else:
                for ch in range(c):
                    acc = b[i, ch]
                    for t in range(first[i], i):
                        acc -= low[row + t] * b[t, ch]
                    b[i, ch] = acc * dinv[i]
        for i in range(m - 1, -1, -1):  # L^T u = y
            row = start[i] - first[i]
            if c == 3:
                v0, v1, v2 = b[i, 0] * dinv[i], b[i, 1] * dinv[i], b[i, 2] * dinv[i]
                b[i, 0], b[i, 1], b[i, 2] = v0, v1, v2
                for t in range(first[i], i):
                    l = low[row + t]
                    b[t, 0] -= l * v0
                    b[t, 1] -= l * v1
                    b[t, 2] -= l * v2
            else:
                for ch in range(c):
                    v = b[i, ch] * dinv[i]
                    b[i, ch] = v
                    for t in range(first[i], i):
                        b[t, ch] -= low[row + t] * v
        for t in range(offsets[j], offsets[j + 1]):
            p = pixels[t]
            for ch in range(c):
                out[j, ch, p // w, p % w] = b[gid[p], ch] + noise[ch, t]


@functools.cache
def _compiled_kernel() -> Callable[..., None] | None:
    """:func:`_impute_kernel` compiled by numba (installed with shap), or ``None`` without numba."""
    try:
        import numba
    except ImportError:
        return None
    return numba.njit(cache=True, nogil=True, error_model="numpy",
                      fastmath={"reassoc", "contract", "nsz", "arcp"})(_impute_kernel)


def _impute_sparse(x: np.ndarray, img: np.ndarray, pixels: np.ndarray, offsets: np.ndarray, noise: np.ndarray,
                   out: np.ndarray) -> None:
    """:func:`_impute_kernel` with scipy's sparse LU, one job at a time: for wide images (the
    envelope grows as ``W**2`` per pixel) and where numba is missing."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

    jobs, c, h, w = out.shape
    for j in range(jobs):
        out[j] = x[img[j]]
        idx = pixels[offsets[j] : offsets[j + 1]]
        removed = np.zeros((1, h, w), dtype=bool)
        removed.reshape(-1)[idx] = True
        rr, cc = np.nonzero(removed[0])
        m = len(rr)
        if m in (0, h * w):  # nothing removed, or nothing kept (singular; Quantus' solve gives 0)
            flat = out[j].reshape(c, -1)
            flat[:, idx] = (0.0 if m else flat[:, idx]) + noise[:, offsets[j] : offsets[j + 1]]
            continue
        diag, rhs = _system_parts(x, img[j : j + 1], removed)
        gid = np.full((h, w), -1)
        gid[rr, cc] = np.arange(m)
        rows, cols, vals = [np.arange(m)], [np.arange(m)], [diag[rr, cc]]
        for (dr, dc), wt in _OFFSETS:
            r2, c2 = rr + dr, cc + dc
            inside = (r2 >= 0) & (r2 < h) & (c2 >= 0) & (c2 < w)
            g = np.full(m, -1)
            g[inside] = gid[r2[inside], c2[inside]]
            rows.append(np.flatnonzero(g >= 0))
            cols.append(g[g >= 0])
            vals.append(np.full(len(cols[-1]), -wt))
        a = csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m, m))
        u = np.zeros((c, h * w))
        u[:, rr * w + cc] = splu(a).solve(np.ascontiguousarray(rhs[0][:, rr, cc].T)).T
        out[j].reshape(c, -1)[:, idx] = u[:, idx] + noise[:, offsets[j] : offsets[j + 1]]


# Widest image (pixels per raster row) imputed by the envelope kernel; wider ones by sparse LU.
_ENVELOPE_MAX_WIDTH = 64


def noisy_linear_imputation(images: np.ndarray, jobs: list[tuple[int, np.ndarray, int]], noise: float) -> np.ndarray:
    """``[J, C, H, W]``: for each job ``(image index, flat pixels, seed)`` the image of
    ``images`` ``[N, C, H, W]`` with those pixels imputed as by Quantus'
    ``noisy_linear_imputation`` with numpy's global RNG seeded by ``seed``: each removed pixel
    is the weighted mean of its 8 neighbours (weights 1/6 side, 1/12 diagonal; neighbours
    outside the image left out), kept pixels fixed, one sparse symmetric positive definite
    system per job for all channels; plus ``noise * randn(C, len(pixels))`` in the order of
    ``pixels``. Equal up to rounding in the solve."""
    images = np.ascontiguousarray(images, dtype=np.float64)
    _, c, h, w = images.shape
    img = np.array([i for i, _, _ in jobs], dtype=np.int64)
    sizes = [len(p) for _, p, _ in jobs]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    pixels = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for _, p, _ in jobs] or [np.zeros(0, np.int64)])
    draws = np.zeros((c, offsets[-1]))
    rng = np.random.RandomState()
    for (_, _, seed), lo, k in zip(jobs, offsets, sizes):
        if k:
            rng.seed(seed)
            draws[:, lo : lo + k] = rng.randn(c, k)
    out = np.empty((len(jobs), c, h, w))
    kernel = _compiled_kernel() if w <= _ENVELOPE_MAX_WIDTH else None
    (kernel or _impute_sparse)(images, img, pixels, offsets, noise * draws, out)
    return out


class ROAD(Metric):
    """Remove And Debias (ROAD): is the explained class still predicted once the most (MoRF) or
    least (LeRF) relevant pixels are imputed from their neighbours?

    For each share ``p`` in ``percentages``, the ``int(H*W*p/100)`` top-ranked pixels of the
    map are replaced by Quantus' ``noisy_linear_imputation`` (each removed pixel is the weighted
    mean of its 8 neighbours, solved as one sparse linear system, plus Gaussian noise of std
    ``noise``): imputed values carry no information about the removed shape, which is the bias
    ROAD removes. The images of one model call are imputed in one compiled pass (a Cholesky
    factorisation per image and share, shared by the channels; :func:`noisy_linear_imputation`),
    equal to Quantus' function up to rounding. The curve ``road_<order>`` is 1 where the model
    still predicts the explained class, 0 where not; the score ``road_<order>`` is its mean over
    the percentages (the area under the accuracy curve). MoRF: lower is better; LeRF: higher is
    better.

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
        if not len(pixels):
            return image
        return noisy_linear_imputation(np.asarray(image)[None], [(0, pixels, seed)], self.noise)[0]

    def __call__(self, model: nn.Module, x: torch.Tensor, attributions: np.ndarray | torch.Tensor,
                 targets: torch.Tensor, masks: np.ndarray | None = None) -> MetricOutput:
        a = np.asarray(attributions, dtype=np.float64)
        n, h, w = a.shape
        ks = (h * w * self.percentages / 100).astype(int)
        xs = x.detach().cpu().double().numpy()
        seeds = [image_seed(self.seed, xs[i]) for i in range(n)]
        flat = a.reshape(n, -1)
        ranks = {o: np.argsort(-flat if o == "morf" else flat, axis=1, kind="stable") for o in self.orders}
        jobs = [(i, o, j) for i in range(n) for o in self.orders for j in range(len(ks))]
        correct = {o: np.zeros((n, len(ks))) for o in self.orders}
        dev = model_device(model)
        for start in range(0, len(jobs), max(1, self.batch_size)):
            chunk = jobs[start : start + self.batch_size]
            imgs = noisy_linear_imputation(xs, [(i, ranks[o][i, : ks[j]], seeds[i] + j) for i, o, j in chunk],
                                           self.noise)
            with torch.no_grad():
                pred = model(torch.from_numpy(imgs).to(dev, x.dtype)).argmax(1).cpu().numpy()
            for (i, o, j), p in zip(chunk, pred):
                correct[o][i, j] = float(p == int(targets[i]))
        return MetricOutput(
            scores={f"{self.name}_{o}": c.mean(1) for o, c in correct.items()},
            curves={f"{self.name}_{o}": c for o, c in correct.items()}, curve_x=self.percentages / 100,
            curve_y="share still classified as the target",
            higher_is_better={f"{self.name}_lerf": True})
