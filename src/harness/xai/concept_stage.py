"""The concept stage of a job whose explainer is concept-level (``xai=crp``).

After the attribution stage: each image's concept relevance at the layer (cached by content),
the concept atlas of the reference images (cached by the model's weights, the reference pixels
and the settings), concept faithfulness against a random ordering of the same concepts, and the
distance of each image to the nearest PCX prototype of its predicted class (an outlier above the
95th percentile of the reference images' own distances). Logged: ``concepts.json`` (per image: top
concepts, shares, prototype distance), ``atlas.npz`` and, unless the run is private, the figures
``concepts/atlas.png`` and ``concepts/<image>.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from harness.cache import StageCache, digest
from harness.tracking.artifacts import safe_name
from harness.xai.concepts import (Atlas, build_atlas, concept_faithfulness, prototypes, region_shares,
                                  split_half_stability)


@dataclass
class ConceptResult:
    """What the job records: per-image scores (into ``per_image.json`` and the summary) and
    each image's top concepts."""

    scores: dict[str, np.ndarray]
    ids: np.ndarray
    shares: np.ndarray
    atlas: Atlas
    reference_pixels: np.ndarray  # uint8 [M, H, W, 3] reference images as the network sees them (the figures')
    info: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)  # run-level scores (stability, separation)
    prototypes: Any = None  # PCX prototypes of the reference images (harness.xai.concepts.Prototypes)
    reference_labels: np.ndarray | None = None
    relevance: np.ndarray | None = None  # [N, C] each job image's relevance per concept (reveal.space=concepts)
    views: list[list[Any]] = field(default_factory=list)  # the first images' concepts (concept_views)


def _relevance(explainer: Any, model: Any, x: torch.Tensor, t: torch.Tensor, batch_size: int) -> np.ndarray:
    out = []
    for i in range(0, len(x), batch_size):
        _, rel, _ = explainer.layer_relevance(model, x[i:i + batch_size], t[i:i + batch_size])
        out.append(rel.flatten(2).sum(2).float().cpu())
    return torch.cat(out).numpy()


def _regions(model: Any, ref: Any) -> dict[str, np.ndarray] | None:
    """The reference images' object, mark and background as network-input masks ``[M, S, S]``,
    where the data has object masks (the regions partition each image)."""
    if ref.masks is None or any(m is None for m in ref.masks):
        return None
    _, obj = model.preprocess(ref.images, ref.masks)
    out = {"object": obj}
    for name, masks in ref.regions.items():
        _, m = model.preprocess(ref.images, masks)
        out[name] = m
    taken = np.zeros_like(obj)
    for name in [*ref.regions, "object"]:  # named regions first: a mark over the object counts as the mark
        out[name] = out[name] & ~taken
        taken |= out[name]
    out["background"] = ~taken
    return out


def concept_stage(explainer: Any, model: Any, x: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor,
                  cache: StageCache, *, predictions_key: str, model_key: str, config: Any, seed: int,
                  batch_size: int, n_views: int | None = None) -> ConceptResult:
    """Concepts, atlas, faithfulness and prototype distances of one job, and the first
    ``n_views`` images' concepts as views (``None``: all)."""
    layer = explainer.layer_name(model)
    key = digest("concepts", predictions_key, config, targets.numpy(), int(seed), layer)
    rel = cache.fetch("concepts", key, lambda: {"relevance": _relevance(explainer, model, x, targets, batch_size)})
    relevance = rel["relevance"]
    ref = explainer.reference
    if ref is None:
        ref_x, ref_t, regions = x, targets, None
    else:
        ref_x, _ = model.preprocess(ref.images)
        ref_t = torch.as_tensor(ref.labels)
        regions = _regions(model, ref)
    settings = {"layer": layer, "top_m": explainer.top_m, "cnn": repr(explainer.cnn), "vit": repr(explainer.vit),
                "regions": None if regions is None else list(regions)}
    atlas_key = digest("atlas", model_key, ref_x, ref_t.numpy(), settings, list((regions or {}).values()))

    def compute_atlas() -> dict[str, np.ndarray]:
        atlas = build_atlas(explainer, model, ref_x, ref_t, top_m=explainer.top_m, batch_size=batch_size)
        if regions is not None:
            atlas.region_shares = region_shares(explainer, model, atlas, ref_x, ref_t, regions, atlas.top_concepts(10))
            atlas.region_names = np.array(list(regions))
        return atlas.arrays()

    atlas = Atlas.from_arrays(cache.fetch("atlas", atlas_key, compute_atlas))
    ref_rel = atlas.per_image
    k = min(explainer.top_k, relevance.shape[1])
    ids = np.argsort(-relevance, axis=1, kind="stable")[:, :k]
    shares = np.take_along_axis(relevance, ids, 1) / np.maximum(np.abs(relevance).sum(1, keepdims=True), 1e-12)
    rel_t = torch.from_numpy(relevance)
    faithful = concept_faithfulness(explainer, model, x, targets, rel_t, explainer.n_concepts, seed=seed)
    shuffled = rel_t[:, torch.randperm(rel_t.shape[1], generator=torch.Generator().manual_seed(seed))]
    random_order = concept_faithfulness(explainer, model, x, targets, shuffled, explainer.n_concepts, seed=seed)
    protos = prototypes(ref_rel, ref_t.numpy(), explainer.n_prototypes, seed=seed)
    distance = protos.distance(relevance, preds.numpy())
    ref_distance = protos.distance(ref_rel, ref_t.numpy())
    threshold = {c: float(np.nanpercentile(ref_distance[ref_t.numpy() == c], 95)) for c in protos.classes}
    outlier = np.array([float(d > threshold.get(int(p), np.inf)) for d, p in zip(distance, preds.numpy())])
    scores = {"concept_faithfulness": faithful, "concept_faithfulness_random": random_order,
              "top_concept_share": shares[:, 0], "prototype_distance": distance, "prototype_outlier": outlier}
    info = {"layer": layer, "n_concepts": int(relevance.shape[1]), "n_reference": len(ref_x)}
    pixels = (ref_x.numpy().transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    stability = split_half_stability(ref_rel, k=10, seed=seed)
    summary = {"concept_stability_spearman": stability["spearman"], "concept_stability_top10": stability["top_jaccard"]}
    if atlas.region_shares is not None:
        summary["concept_separation"] = atlas.separation(10)
        top = atlas.region_shares[atlas.top_concepts(10)]
        top = top[np.isfinite(top).all(1)]
        for j, name in enumerate(atlas.region_names):  # of the top-10 concepts, how many lie mostly in each region
            summary[f"concepts_in_{name}"] = float((top.argmax(1) == j).sum())
    result = ConceptResult(scores, ids, shares, atlas, pixels, info, summary, protos, ref_t.numpy(), relevance=relevance)
    result.views = concept_views(result, explainer, model, x, targets, len(x) if n_views is None else n_views)
    return result


def concept_views(result: ConceptResult, explainer: Any, model: Any, x: torch.Tensor, targets: torch.Tensor,
                  n: int) -> list[list[Any]]:
    """The first ``n`` images' top concepts as :class:`~harness.mllm.base.Concept` (conditional
    heatmaps from one batched pass, reference patches from the atlas): what ``render=concepts``
    draws, the verbaliser describes and the figures show."""
    from harness.mllm.base import Concept
    from harness.xai.concepts import crop

    n = min(int(n), len(x))
    if n == 0:
        return []
    maps = explainer.conditional(model, x[:n], targets[:n], torch.from_numpy(result.ids[:n])).numpy()
    ref, atlas = result.reference_pixels, result.atlas
    size = tuple(ref.shape[1:3])
    views = []
    for i in range(n):
        row = []
        for j, c in enumerate(result.ids[i]):
            refs = [(int(k), tuple(int(v) for v in b)) for k, b in zip(atlas.by_relevance[c], atlas.relevance_boxes[c])
                    if k >= 0]
            row.append(Concept(int(c), float(result.shares[i, j]), maps[i, j], [crop(ref[k], b) for k, b in refs],
                               [b for _, b in refs], size))
        views.append(row)
    return views


def log_concepts(rec: Any, result: ConceptResult, x: torch.Tensor, ids: list[str], private: bool,
                 n_figures: int = 8, class_names: list[str] | None = None) -> None:
    """``concepts.json``, ``atlas.npz`` and (not private) the atlas and prototype figures and one
    figure for each of the first ``n_figures`` images with views."""
    from harness.render.concepts import atlas_figure, concept_figure, prototype_figure

    rows = [{"image_id": i, "layer": result.info["layer"], "concepts": [int(c) for c in cs],
             "shares": [round(float(s), 6) for s in sh],
             **{k: (None if not np.isfinite(v[n]) else float(v[n])) for k, v in result.scores.items()}}
            for n, (i, cs, sh) in enumerate(zip(ids, result.ids, result.shares))]
    rec.text(json.dumps(rows, indent=1), "concepts.json")
    with rec.folder() as tmp:
        np.savez_compressed(tmp / "atlas.npz", **result.atlas.arrays())
        if not private:
            (tmp / "concepts").mkdir()
            ref_pixels = list(result.reference_pixels)
            atlas_figure(result.atlas, ref_pixels, tmp / "concepts" / "atlas.png")
            prototype_figure(result.prototypes, result.atlas.per_image, result.reference_labels, ref_pixels,
                             tmp / "concepts" / "prototypes.png", class_names)
            views = result.views[:n_figures]
            pixels = (x[: len(views)].numpy().transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
            for j, row in enumerate(views):
                concept_figure(pixels[j], np.stack([c.heatmap for c in row]), np.array([c.channel for c in row]),
                               np.array([c.share for c in row]), result.atlas, ref_pixels,
                               tmp / "concepts" / f"{safe_name(ids[j])}.png", title=ids[j])
