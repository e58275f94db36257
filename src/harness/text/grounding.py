"""Is an answer specific, and grounded in what the attribution marks?"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from harness.evaluation.region_mass import box_inside, check_box
from harness.mllm.base import Record
from harness.mllm.verbaliser import grid_cells, mass_grid
from harness.text.base import Context, TextMetric, words

_V, _H = r"(upper|top|lower|bottom)", r"(left|right|centre|center|middle)"
CORNER = re.compile(rf"\b{_V}[\s-]*(?:{_H})\b|\b{_H}[\s-]+{_V}\b".replace("(?:", "("), re.I)
ROW = {"upper": 0, "top": 0, "lower": 2, "bottom": 2}
COL = {"left": 0, "right": 2, "centre": 1, "center": 1, "middle": 1}
SINGLE = re.compile(r"\b(upper|top|lower|bottom|left|right|centre|center|middle|central)\b", re.I)
# Words that name what is seen (colour, shape, texture, parts), for the feature count.
VISUAL = frozenset("""
red orange yellow green blue purple pink brown black white grey gray colour color colours colors bright dark
shade shadow round circle circular curve curved curves edge edges corner corners line lines stripe stripes striped
spot spots spotted pattern patterns texture textured smooth rough shape shapes outline contour contours square
triangle triangular point pointed eye eyes ear ears nose mouth face fur hair feather feathers wing wings leg legs
tail head paw paws whisker whiskers beak wheel wheels window windows door roof leaf leaves petal petals branch
""".split())


def mentioned_regions(text: str) -> list[set[tuple[int, int]]]:
    """The 3 x 3 grid cells each spatial phrase of ``text`` names: ``upper left`` one cell,
    ``top`` a row, ``left`` a column, ``centre`` the middle cell."""
    out, rest = [], text
    for m in CORNER.finditer(text):
        v = next(g for g in m.groups() if g and g.lower() in ROW).lower()
        h = next(g for g in m.groups() if g and g.lower() in COL).lower()
        out.append({(ROW[v], COL[h])})
        rest = rest.replace(m.group(0), " ")
    for m in SINGLE.finditer(rest):
        w = m.group(1).lower()
        if w in ROW:
            out.append({(ROW[w], c) for c in range(3)})
        elif w in ("left", "right"):
            out.append({(r, COL[w]) for r in range(3)})
        else:
            out.append({(1, 1)})
    return out


def box_share_in_cells(box: tuple[int, int, int, int], cells: set[tuple[int, int]], height: int,
                       width: int) -> float:
    """Share of ``box`` (``[top, left, bottom, right]``, bottom/right exclusive) whose pixels lie
    in the 3 x 3 grid ``cells`` of an ``height x width`` image."""
    top, left, bottom, right = box
    rows, cols = grid_cells(height, width)
    r, c = rows[top:bottom], cols[left:right]
    inside = np.array([[(i, j) in cells for j in c] for i in r], dtype=bool)
    return float(inside.mean())


class Grounding(TextMetric):
    """Specificity and grounding of an answer.

    - ``names_class``: 1 if the answer names the predicted class (singular or plural), else 0;
    - ``other_classes``: how many other classes of the dataset it names (claims the
      classification does not support);
    - ``feature_words``: how many words naming visual features (colours, shapes, textures,
      parts) it uses;
    - ``spatial_mentions``: how many image regions it names (``upper left``, ``top``,
      ``centre`` ...: each mapped to cells of a 3 x 3 grid);
    - ``spatial_grounding``: of the regions named, the share that hold more of the map's
      positive attribution mass than their share of the image (NaN when none is named): 1 when
      every region the text points to is one the attribution marks;
    - ``unsupported_regions``: regions named that hold less than half their area's share of the
      mass: places the text points to that the attribution does not support;
    - ``points_to_box`` (only with ``box``): the share of the box's area that lies in the grid
      cells the text names (all its regions together; NaN when it names none). With the box on a
      known artifact (e.g. the shapes dataset's spurious mark), 1 means the text points the
      reader to the artifact, 0 that it points elsewhere. A readout like ``region_mass``: higher
      = more towards the box.

    Args:
        box: ``[top, left, bottom, right]`` in the pixels of the model's input (the attribution
            map's), bottom and right exclusive, or ``None`` (no ``points_to_box``). A box that
            reaches outside the input is an error.
    """

    family: ClassVar[str] = "grounding"
    directions: ClassVar[dict[str, bool]] = {
        "names_class": True, "other_classes": False, "feature_words": True, "spatial_mentions": True,
        "spatial_grounding": True, "unsupported_regions": False}

    def __init__(self, box: Sequence[int] | None = None) -> None:
        self.box = None if box is None else check_box(box, "text_metrics.grounding.box")
        if self.box is not None:
            self.directions = {**type(self).directions, "points_to_box": True}

    def scores(self, text: str, ctx: Context) -> dict[str, float]:
        ws = words(text)
        joined = " " + " ".join(ws) + " "

        def named(name: str) -> bool:
            n = " ".join(words(name))
            return bool(n) and any(f" {n}{s} " in joined for s in ("", "s", "es"))

        grid = mass_grid(ctx.attribution)
        regions = mentioned_regions(text)
        support = [sum(grid[c] for c in cells) / (len(cells) / 9) for cells in regions] if grid.sum() > 0 else \
            [0.0] * len(regions)
        out = {"names_class": float(named(ctx.label)),
               "other_classes": float(sum(named(c) for c in ctx.class_names if c != ctx.label)),
               "feature_words": float(sum(w in VISUAL for w in ws)),
               "spatial_mentions": float(len(regions)),
               "spatial_grounding": float(np.mean([s > 1 for s in support])) if regions else float("nan"),
               "unsupported_regions": float(sum(s < 0.5 for s in support))}
        if self.box is not None:
            h, w = np.shape(ctx.attribution)[-2:]
            box_inside(self.box, h, w, "text_metrics.grounding.box")
            named_cells = set().union(*regions)
            out["points_to_box"] = box_share_in_cells(self.box, named_cells, h, w) if regions else float("nan")
        return out

    def __call__(self, records: list[Record], contexts: dict[str, Context]) -> dict[str, np.ndarray]:
        rows = [self.scores(r.text, contexts[r.image_id]) for r in records]
        return {k: np.array([row[k] for row in rows], dtype=float) for k in self.directions}
