"""What a concept (a channel of a layer) is, seen through reference images, and how it is used.

- :func:`build_atlas`: relevance maximisation (Achtibat et al. 2023): for every concept the
  reference images in which it is most *relevant* to the decision (the relevance of the
  channel for the image's target class), beside the images where it *fires* most (its largest
  activation), each with the box where the concept's relevance (or activation) lies, read from
  the layer's own spatial map. One LRP pass over the reference set.
- :func:`concept_faithfulness`: switching a concept's channel off lowers the target logit in
  proportion to the concept's relevance: the rank correlation over concepts, per image.
- :func:`prototypes` (PCX, Dreyer et al. 2024): per class, a Gaussian mixture over the images'
  concept-relevance vectors; its components are the class's prototypes, and an image's
  distance to the nearest prototype of its class flags predictions unlike the training ones.

References:
    Achtibat et al., "From attribution maps to human-understandable explanations through
    Concept Relevance Propagation", Nature Machine Intelligence 5, 2023.
    Dreyer, Achtibat, Samek & Lapuschkin, "Understanding the (Extra-)Ordinary: Validating Deep
    Model Decisions with Prototypical Concept-based Explanations", CVPR workshops 2024.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.types import HarnessError
from harness.xai.base import network


@dataclass
class Atlas:
    """Reference images per concept. Arrays are ``[C, m]`` (``-1``: fewer than ``m`` images
    with positive relevance) and boxes ``[C, m, 4]`` as ``(top, left, bottom, right)`` pixels."""

    layer: str
    by_relevance: np.ndarray
    relevance: np.ndarray
    relevance_boxes: np.ndarray
    by_activation: np.ndarray
    activation: np.ndarray
    activation_boxes: np.ndarray
    mean_relevance: np.ndarray  # [C]: the concept's mean relevance over the reference images
    region_shares: np.ndarray | None = None  # [C, R]: share of the concept's relevance in each region (region_shares)
    region_names: np.ndarray | None = None   # [R]: e.g. object, mark, background
    per_image: np.ndarray | None = None      # [M, C]: each reference image's relevance per concept (PCX, stability)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in vars(self).items() if k != "layer" and v is not None} | {"layer": np.array(self.layer)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> Atlas:
        return cls(layer=str(a["layer"]), **{k: np.asarray(v) for k, v in a.items() if k != "layer"})

    def separation(self, k: int = 10) -> float:
        """How cleanly the ``k`` most relevant concepts each stay in one region: the mean over
        them of the largest region share (1: every concept in one region only)."""
        if self.region_shares is None:
            return float("nan")
        return float(np.nanmean(self.region_shares[self.top_concepts(k)].max(1)))

    @property
    def n_concepts(self) -> int:
        return len(self.mean_relevance)

    def top_concepts(self, k: int) -> np.ndarray:
        """The ``k`` concepts with the largest mean relevance over the reference set."""
        return np.argsort(-self.mean_relevance, kind="stable")[:k]


def _grid(model: nn.Module, rel: torch.Tensor) -> torch.Tensor:
    """A layer's per-position map as a spatial grid ``[N, C, h, w]`` (tokens: patch tokens on
    the patch grid, prefix tokens dropped)."""
    if rel.ndim == 4:
        return rel
    net = network(model)
    prefix = getattr(net, "num_prefix_tokens", 1)
    gh, gw = net.patch_embed.grid_size
    return rel[:, :, prefix:].reshape(len(rel), rel.shape[1], gh, gw)


def boxes(grid: np.ndarray, size: tuple[int, int], fraction: float = 0.5) -> np.ndarray:
    """``[..., h, w]`` maps to ``[..., 4]`` pixel boxes around the cells at or above
    ``fraction`` of each map's maximum (the whole image where a map has no positive value)."""
    h, w = grid.shape[-2:]
    flat = grid.reshape(-1, h, w)
    out = np.zeros((len(flat), 4), dtype=np.int64)
    for i, g in enumerate(flat):
        peak = g.max()
        if not peak > 0:
            out[i] = (0, 0, size[0], size[1])
            continue
        rows, cols = np.nonzero(g >= fraction * peak)
        out[i] = (rows.min() * size[0] // h, cols.min() * size[1] // w,
                  -(-(rows.max() + 1) * size[0] // h), -(-(cols.max() + 1) * size[1] // w))
    return out.reshape(*grid.shape[:-2], 4)


def region_shares(crp: Any, model: nn.Module, atlas: Atlas, x: torch.Tensor, targets: torch.Tensor,
                  regions: dict[str, np.ndarray], concepts: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``[C, R]`` (NaN for concepts not asked for): for each of ``concepts``, how its positive
    conditional relevance on its atlas reference images (``x``: the reference set) is spread over
    the regions (``regions``: name to ``[M, H, W]`` masks partitioning each image), as relevance per
    pixel of each region, normalised to sum to 1: a concept on a 3x3 mark is a mark concept even
    though the mark is 1 % of the image."""
    masks = np.stack(list(regions.values()), 1)  # [M, R, H, W]
    out = np.full((atlas.n_concepts, masks.shape[1]), np.nan)
    rows = [(int(i), int(c)) for c in concepts for i in atlas.by_relevance[c] if i >= 0]
    if not rows:
        return out
    idx = torch.tensor([i for i, _ in rows])
    ch = torch.tensor([[c] for _, c in rows])
    maps = np.concatenate([crp.conditional(model, x[idx[j:j + batch_size]], targets[idx[j:j + batch_size]],
                                           ch[j:j + batch_size])[:, 0].numpy() for j in range(0, len(rows), batch_size)])
    pos = np.clip(maps, 0, None)
    region = masks[idx.numpy()].astype(np.float64)
    mass = np.einsum("nhw,nrhw->nr", pos, region)  # [rows, R]
    area = region.sum((2, 3))
    for c in concepts:
        sel = [j for j, (_, cc) in enumerate(rows) if cc == c]
        density = mass[sel].sum(0) / np.maximum(area[sel].sum(0), 1)
        if sel and density.sum() > 0:
            out[c] = density / density.sum()
    return out


def split_half_stability(relevance: np.ndarray, k: int = 10, seed: int = 0) -> dict[str, float]:
    """Stability of the concepts across reference sets: the reference images (their relevance
    ``[M, C]``) split at random into halves; Spearman's correlation of the concepts' mean relevance
    in the two halves, and the overlap (Jaccard) of their ``k`` most relevant concepts."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(relevance))
    a, b = relevance[order[: len(order) // 2]].mean(0), relevance[order[len(order) // 2:]].mean(0)
    ta, tb = set(np.argsort(-a)[:k]), set(np.argsort(-b)[:k])
    rho = spearmanr(a, b).statistic if np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")
    return {"spearman": float(rho), "top_jaccard": len(ta & tb) / len(ta | tb)}


def build_atlas(crp: Any, model: nn.Module, x: torch.Tensor, targets: torch.Tensor, top_m: int = 8,
                batch_size: int = 64, box_fraction: float = 0.5) -> Atlas:
    """The concept atlas of ``crp``'s layer on reference images ``x`` (targets: their classes):
    one LRP pass over them."""
    if len(x) == 0:
        raise HarnessError("the concept atlas needs reference images; the reference set is empty")
    rel_sum, act_max, rel_grids, act_grids = [], [], [], []
    for i in range(0, len(x), batch_size):
        _, rel, act = crp.layer_relevance(model, x[i:i + batch_size], targets[i:i + batch_size])
        rel_g, act_g = _grid(model, rel).float().cpu(), _grid(model, act).float().cpu()
        rel_sum.append(rel.flatten(2).sum(2).float().cpu())
        act_max.append(act_g.flatten(2).amax(2))
        rel_grids.append(rel_g.half())
        act_grids.append(act_g.half())
    r = torch.cat(rel_sum).numpy()  # [M, C]
    a = torch.cat(act_max).numpy()
    rg, ag = torch.cat(rel_grids).float().numpy(), torch.cat(act_grids).float().numpy()
    m = min(int(top_m), len(x))
    size = tuple(x.shape[-2:])

    def top(scores: np.ndarray, grids: np.ndarray, positive: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        order = np.argsort(-scores, axis=0, kind="stable")[:m].T  # [C, m]
        vals = np.take_along_axis(scores.T, order, 1)
        if positive:
            order = np.where(vals > 0, order, -1)
        cells = grids[np.clip(order, 0, None), np.arange(scores.shape[1])[:, None]]  # [C, m, h, w]
        return order, vals, boxes(cells, size, box_fraction)

    by_r, r_vals, r_boxes = top(r, rg, True)
    by_a, a_vals, a_boxes = top(a, ag, False)
    return Atlas(crp.layer_name(model), by_r, r_vals, r_boxes, by_a, a_vals, a_boxes, r.mean(0), per_image=r)


def crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    top, left, bottom, right = (int(v) for v in box)
    return image[top:bottom, left:right]


@contextmanager
def _channel_off(module: nn.Module, channels: torch.Tensor):
    """Row i of the batch runs with channel ``channels[i]`` of ``module``'s output set to zero."""
    def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(out.shape[0], out.shape[1] if out.ndim == 4 else out.shape[-1], dtype=out.dtype,
                          device=out.device)
        keep[torch.arange(len(keep)), channels.to(out.device)] = 0
        return out * (keep[:, :, None, None] if out.ndim == 4 else keep[:, None, :])

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def concept_faithfulness(crp: Any, model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                         relevance: torch.Tensor, n_concepts: int = 16, seed: int = 0,
                         batch_size: int = 256) -> np.ndarray:
    """Per image: Spearman's correlation, over ``n_concepts`` concepts (the most relevant half,
    the rest drawn at random), between a concept's relevance and the drop of the target logit
    when its channel is switched off. ``relevance`` is ``[N, C]`` (:meth:`CRP.concepts`)."""
    from scipy.stats import spearmanr

    module = crp._module(model)
    n, c = relevance.shape
    k = min(int(n_concepts), c)
    rng = np.random.default_rng(seed)
    base = model(x).gather(1, targets[:, None])[:, 0]
    out = np.full(n, np.nan)
    for i in range(n):
        top = torch.argsort(relevance[i], descending=True)[: k // 2].cpu().numpy()
        rest = np.setdiff1d(np.arange(c), top)
        chosen = np.concatenate([top, rng.choice(rest, size=min(k - len(top), len(rest)), replace=False)])
        ch = torch.as_tensor(chosen)
        drops = []
        for j in range(0, len(ch), batch_size):
            part = ch[j:j + batch_size]
            with _channel_off(module, part):
                logit = model(x[i:i + 1].expand(len(part), *x.shape[1:])).gather(
                    1, targets[i].expand(len(part))[:, None])[:, 0]
            drops.append(base[i] - logit)
        drop = torch.cat(drops).cpu().numpy()
        rel = relevance[i, ch].cpu().numpy()
        if np.ptp(drop) > 0 and np.ptp(rel) > 0:
            out[i] = float(spearmanr(rel, drop).statistic)
    return out


@dataclass
class Prototypes:
    """PCX prototypes: per class ``k``, ``means[k]`` ``[p, C]``, the components of its Gaussian
    mixture over concept-relevance vectors (each normalised to unit L1 norm), and the mixture."""

    classes: list[int]
    means: dict[int, np.ndarray]
    models: dict[int, Any]

    def distance(self, vectors: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Each vector's Euclidean distance to the nearest prototype of its class (NaN for a
        class without prototypes)."""
        v = _normalise(vectors)
        out = np.full(len(v), np.nan)
        for i, (vec, k) in enumerate(zip(v, classes)):
            if int(k) in self.means:
                out[i] = float(np.linalg.norm(self.means[int(k)] - vec, axis=1).min())
        return out

    def nearest(self, vectors: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """The index of each vector's nearest prototype within its class (-1 without one)."""
        v = _normalise(vectors)
        return np.array([int(np.linalg.norm(self.means[int(k)] - vec, axis=1).argmin()) if int(k) in self.means
                         else -1 for vec, k in zip(v, classes)])


def _normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.maximum(np.abs(v).sum(1, keepdims=True), 1e-12)


def prototypes(vectors: np.ndarray, classes: np.ndarray, n_prototypes: int = 4, seed: int = 0) -> Prototypes:
    """PCX prototypes per class from concept-relevance vectors ``[N, C]`` (see :class:`Prototypes`):
    a diagonal Gaussian mixture per class with up to ``n_prototypes`` components (at most half
    as many as the class has images; a class of one image is its own prototype)."""
    from sklearn.mixture import GaussianMixture

    v = _normalise(vectors)
    means, models = {}, {}
    for k in np.unique(classes):
        rows = v[classes == k]
        if len(rows) < 2:  # one image: it is its class's prototype
            means[int(k)], models[int(k)] = rows.copy(), None
            continue
        p = max(1, min(int(n_prototypes), len(rows) // 2))
        gmm = GaussianMixture(n_components=p, covariance_type="diag", random_state=seed, reg_covar=1e-6).fit(rows)
        means[int(k)], models[int(k)] = gmm.means_, gmm
    return Prototypes(sorted(means), means, models)
