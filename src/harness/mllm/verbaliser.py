"""An offline, deterministic, non-LLM baseline: the attribution described in plain words."""

from __future__ import annotations

import time

import numpy as np

from harness.mllm.base import MLLM, Answer, Request

ROWS = ("upper", "middle", "lower")
COLS = ("left", "centre", "right")


def region_name(row: int, col: int) -> str:
    """The words for a cell of the 3 x 3 grid (``0..2`` each)."""
    if (row, col) == (1, 1):
        return "centre"
    if row == 1:
        return f"{COLS[col]} side"
    if col == 1:
        return f"{ROWS[row]} centre"
    return f"{ROWS[row]} {COLS[col]}"


def grid_cells(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The 3 x 3 grid row of each pixel row, and column of each pixel column, of an
    ``height x width`` image."""
    return np.minimum(np.arange(height) * 3 // height, 2), np.minimum(np.arange(width) * 3 // width, 2)


def mass_grid(attribution: np.ndarray) -> np.ndarray:
    """Share of the positive attribution mass in each cell of a 3 x 3 grid (sums to 1; zeros
    when the map has no positive part)."""
    a = np.clip(np.nan_to_num(np.asarray(attribution, dtype=np.float64)), 0, None)
    h, w = a.shape
    r, c = grid_cells(h, w)
    grid = np.zeros((3, 3))
    np.add.at(grid, (r[:, None].repeat(w, 1), c[None, :].repeat(h, 0)), a)
    total = grid.sum()
    return grid / total if total > 0 else grid


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 220, 40),
           "magenta": (210, 40, 210), "cyan": (40, 210, 220), "orange": (240, 140, 30), "brown": (130, 80, 40),
           "white": (240, 240, 240), "grey": (128, 128, 128), "black": (20, 20, 20)}


def colour_name(rgb: np.ndarray) -> str:
    """The nearest of a few colour words to an RGB triple (0-255)."""
    names = list(COLOURS)
    d = np.linalg.norm(np.asarray([COLOURS[n] for n in names], float) - np.asarray(rgb, float), axis=1)
    return names[int(d.argmin())]


def _share_words(names: list[str], prefix: str = "", mixed: str = "of mixed colours") -> str:
    """``mostly <prefix><most common> (n of m)`` when one word holds most, else ``mixed (...)``."""
    top, n = max(((x, names.count(x)) for x in set(names)), key=lambda t: (t[1], t[0]))
    if 2 * n > len(names):
        return f"{'all' if n == len(names) and n > 1 else 'mostly'} {prefix}{top} ({n} of {len(names)})"
    return f"{mixed} ({', '.join(sorted(set(names)))})"


def describe_concepts(req: Request) -> str:
    """The concepts of ``req`` in words: where each lies in this image (and how much of it on
    the object, where the mask is known), and what its reference patches share: their colour and
    where they sit in their own images."""
    parts = []
    for i, c in enumerate(req.concepts or [], start=1):
        grid = mass_grid(c.heatmap)
        where = region_name(*divmod(int(grid.argmax()), 3)) if grid.sum() > 0 else "nowhere in particular"
        text = f"{i}. Concept {c.channel} ({c.share:.0%} of the relevance): in this image it lies in the {where}"
        if req.mask is not None and np.asarray(req.mask).any():
            pos = np.clip(np.nan_to_num(c.heatmap), 0, None)
            if pos.sum() > 0:
                text += f", {pos[np.asarray(req.mask, bool)].sum() / pos.sum():.0%} of it on the object"
        if c.patches:
            colours = [colour_name(np.median(p.reshape(-1, 3), 0)) for p in c.patches]
            h, w = c.reference_size
            cells = [region_name(min((b[0] + b[2]) * 3 // (2 * h), 2), min((b[1] + b[3]) * 3 // (2 * w), 2))
                     for b in c.boxes]
            text += (f"; its reference patches are {_share_words(colours)} and lie "
                     f"{_share_words(cells, 'in the ', 'in several places')} of their images")
        parts.append(text + ".")
    return " ".join(parts)


class Verbaliser(MLLM):
    """States where the attribution mass lies, deterministically and without any model.

    The answer names the predicted label (and confidence), the grid regions (3 x 3: upper left
    ... lower right) that together hold at least ``min_share`` of the positive attribution mass,
    largest first with their shares, the location of the peak, and, where an object mask is
    known, the share of the mass on the object and the share of the object covered by the top
    ``top_share`` of pixels. With concepts (``xai=crp``) it then describes each concept: where it
    lies in the image, its share of the object, and the colour and position its reference
    patches share. It is what the harness answers with when no LLM is available, and a
    reference point for LLM answers. ``decoding`` is accepted and recorded but changes nothing.
    """

    backend = "verbaliser"

    def __init__(self, min_share: float = 0.5, top_share: float = 0.2, decoding: dict | None = None) -> None:
        super().__init__("verbaliser", decoding)
        self.min_share, self.top_share = float(min_share), float(top_share)

    def identity(self) -> dict:
        return {**super().identity(), "min_share": self.min_share, "top_share": self.top_share}

    def describe(self, req: Request) -> str:
        a = np.nan_to_num(np.asarray(req.attribution, dtype=np.float64))
        head = f"The classifier predicted \"{req.label}\""
        head += f" with {req.score:.0f}% confidence." if req.score is not None else "."
        grid = mass_grid(a)
        if grid.sum() == 0:
            return head + " The explanation marks no part of the image as supporting this decision."
        order = np.argsort(-grid.ravel(), kind="stable")
        cells, total = [], 0.0
        for i in order:
            cells.append(i)
            total += grid.ravel()[i]
            if total >= self.min_share:
                break
        parts = [f"the {region_name(*divmod(int(i), 3))}" + (f" ({grid.ravel()[i]:.0%})" if len(cells) > 1 else "")
                 for i in cells]
        where = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        text = f"{head} Most of the evidence ({total:.0%}) lies in {where} of the image."
        pr, pc = np.unravel_index(int(np.argmax(a)), a.shape)
        h, w = a.shape
        text += f" The strongest evidence is in the {region_name(min(pr * 3 // h, 2), min(pc * 3 // w, 2))}."
        if req.mask is not None and np.asarray(req.mask).any():
            m = np.asarray(req.mask, bool)
            pos = np.clip(a, 0, None)
            on = pos[m].sum() / pos.sum()
            k = max(1, int(round(self.top_share * a.size)))
            top = np.zeros(a.size, bool)
            top[np.argsort(-a.ravel(), kind="stable")[:k]] = True
            covered = (top.reshape(a.shape) & m).sum() / m.sum()
            text += (f" {on:.0%} of the evidence lies on the object, and the most relevant "
                     f"{self.top_share:.0%} of the image covers {covered:.0%} of the object.")
        return text

    def generate(self, requests: list[Request]) -> list[list[Answer]]:
        out = []
        for req in requests:
            t0 = time.perf_counter()
            text = self.describe(req)
            if req.concepts:
                text += f" It relied most on {len(req.concepts)} concepts. " + describe_concepts(req)
            out.append([Answer(text, time.perf_counter() - t0, None, len(text.split()), "stop")]
                       * self.decoding.num_samples)
        return out
