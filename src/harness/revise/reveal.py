"""Reveal: find the artifacts a model relies on from its explanations alone, and, where the data
knows where its artifacts are (``ImageSet.regions``), score what was found against them.

``reveal=spray`` clusters each class's heatmaps (SpRAy, :mod:`harness.revise.spray`); the most
suspicious cluster of each class (its maps most alike) is the candidate. The concept-level
reveal is ``xai=crp`` with a reference set that carries the artifacts: the concept stage counts
the atlas's top concepts lying mostly on each region (``concepts_in_<region>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.revise.spray import MIN_GAP, Spray, spray
from harness.types import HarnessError


@dataclass
class Revealed:
    """SpRAy's clusters per space, the scores logged with the run, and a JSON-ready description."""

    spray: dict[str, Spray]
    summary: dict[str, float]
    description: dict[str, Any] = field(default_factory=dict)


class SprayReveal:
    """SpRAy on the job's maps, per explained class (Lapuschkin et al. 2019; Pahde et al. 2023).

    Scores, per space, besides SpRAy's own (``spray_<space>_classes_split``,
    ``spray_<space>_max_eigengap``, ...), for each region ``r`` of the data (a planted artifact):
    in the class whose images carry ``r`` most often, split into clusters by SpRAy alone, the
    cluster that holds ``r`` most purely is looked up with the answer key: the share of its
    images that carry ``r`` (``spray_<space>_precision_<r>``; 0 when the class is one cluster:
    nothing found) and the share of the class's images with ``r`` it holds
    (``spray_<space>_recall_<r>``). Which cluster is the artifact's is what a person decides by
    looking at them (``spray_<space>.png``); the split is the model's and data's alone.

    Args:
        size: side of the downsampled maps.
        n_neighbors: of the kNN graph.
        max_clusters: most clusters per class.
        min_gap: relative eigengap below which a class is one cluster (:data:`~harness.revise.spray.MIN_GAP`).
        min_size: clusters smaller than this rank last.
        space: what is clustered, one or a list of: ``maps`` (the heatmaps, the SpRAy of
            Lapuschkin et al.: finds an artifact at a fixed place) and ``concepts`` (each image's
            relevance per channel of the concept layer, with ``xai=crp``: R2R's latent SpRAy, which
            also finds artifacts that move). Scores are named ``spray_<space>_...``.
        seed: of the k-means step.
    """

    SPACES = ("maps", "concepts")

    def __init__(self, size: int = 8, n_neighbors: int = 10, max_clusters: int = 6, min_gap: float = MIN_GAP,
                 min_size: int = 3, space: str | list[str] = "maps", seed: int = 0) -> None:
        self.spaces = [space] if isinstance(space, str) else list(space)
        if not self.spaces or any(s not in self.SPACES for s in self.spaces):
            raise HarnessError(f"reveal.space={space!r} is not valid; valid: {', '.join(self.SPACES)}, or a list of them")
        self.kwargs = {"size": int(size), "n_neighbors": int(n_neighbors), "max_clusters": int(max_clusters),
                       "min_gap": float(min_gap), "min_size": int(min_size), "seed": int(seed)}

    def __call__(self, features: dict[str, np.ndarray], labels: np.ndarray,
                 regions: dict[str, np.ndarray] | None = None, ids: list[str] | None = None) -> Revealed:
        """SpRAy in each space of ``features`` (``{"maps": [N, H, W], "concepts": [N, C]}``)."""
        labels = np.asarray(labels)
        summary: dict[str, float] = {}
        results, described = {}, {}
        for space in self.spaces:
            result = results[space] = spray(np.asarray(features[space]), labels, **self.kwargs)
            summary |= {k.replace("spray_", f"spray_{space}_", 1): v for k, v in result.summary().items()}
            for name, masks in (regions or {}).items():
                has = np.asarray(masks).reshape(len(labels), -1).any(1)
                if not has.any():
                    continue
                cls = int(np.bincount(labels[has]).argmax())
                c = result.get(cls)
                best = max(range(c.k), key=lambda j: has[c.members(j)].mean()) if c.k > 1 else None
                members = c.members(best) if best is not None else np.empty(0, int)
                summary[f"spray_{space}_precision_{name}"] = float(has[members].mean()) if len(members) else 0.0
                summary[f"spray_{space}_recall_{name}"] = float(has[members].sum() / has[labels == cls].sum())
            described[space] = [
                {"label": int(c.label), "k": int(c.k), "eigengap": float(c.eigengap),
                 "clusters": [{"cluster": int(j), "size": int((c.assignment == j).sum()),
                               "tightness": float(c.tightness[j]),
                               "members": [ids[i] if ids else int(i) for i in c.members(int(j))]}
                              for j in c.order]}
                for c in result.classes]
        return Revealed(results, summary, {"settings": self.kwargs, "summary": summary, "spaces": described})


def log_reveal(rec: Any, revealed: Revealed, class_names: list[str] | None = None) -> None:
    """``reveal/spray.json`` (clusters, their members, the scores) and ``reveal/spray_<space>.png``
    (each class's cluster means, most suspicious first) into the run."""
    from harness.revise.spray import spray_figure

    with rec.folder("reveal") as tmp:  # relevance only, no pixels: safe with privacy.enabled
        (tmp / "spray.json").write_text(json.dumps(revealed.description, indent=2, default=float))
        for space, result in revealed.spray.items():
            spray_figure(result, tmp / f"spray_{space}.png", class_names=class_names)
