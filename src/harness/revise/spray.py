"""SpRAy, Spectral Relevance Analysis: spectral clustering of the heatmaps of each class, to find sub-populations
of images that the model explains alike (e.g. a Clever-Hans artefact that all of them point at).

Lapuschkin, Wäldchen, Binder, Montavon, Samek & Müller, "Unmasking Clever Hans predictors and assessing what
machines really learn", Nature Communications 10, 1096 (2019); used again to find artefacts to correct in Pahde,
Dreyer, Samek & Lapuschkin, "Reveal to Revise: An Explainable AI Life Cycle for Iterative Bias Correction of Deep
Models", MICCAI 2023.

Per class, following the paper: keep the positive relevance of each map, downsample it by area averaging to size x
size and normalise it to sum 1; build a symmetric k-nearest-neighbour graph on these vectors (Euclidean,
connectivity weights); take the smallest eigenvalues of its normalised Laplacian; choose the number of clusters by
the largest eigengap (here relative to the eigenvalue after it, see :data:`MIN_GAP`); cluster by spectral clustering
(Ng, Jordan & Weiss: the first ``k`` eigenvectors, rows normalised, k-means). The clusters are then ranked by how
alike their maps are (``tightness``): a tight cluster, whose maps all look the same, is the first candidate for an
artefact to inspect.

numpy in, numpy out; scikit-learn and scipy are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MIN_GAP = 0.9
"""Default ``min_gap`` of :func:`spray`: below it, one cluster (k=1).

The gap is relative, ``(lambda_k - lambda_{k-1}) / lambda_k`` for k = 2..max_clusters (eigenvalues of the normalised
Laplacian, ascending, ``lambda_0 = 0``): 1 - the ratio of the k-th smallest eigenvalue to the next. A sub-population
of near-identical maps is (nearly) its own component of the kNN graph, so ``lambda_{k-1}`` is (nearly) 0 and the
relative gap (nearly) 1, whatever the number of images. The plain (absolute) eigengap does not separate the cases:
on the tests' kind of data (60 maps per class, 10 neighbours, 8x8) a class of blobs at random positions, one
continuum of maps, has absolute gaps up to 0.27 among its first 7 eigenvalues (the low spectrum of a 2-d random
geometric graph), while in a class of 20 identical corner maps among 40 blobs the gap after the second zero
eigenvalue is only 0.08 - 0.20 and its largest gap 0.18 - 0.29 lies among the blobs. Relative gaps measured on
synthetic 32x32 maps with seeded noise, 40 - 200 maps per class: 1.00 for a separate sub-population of identical
maps; at most 0.85 for blobs moving along a line (a 1-d continuum, whose Weyl law ``lambda_j ~ j^2`` gives 0.75),
0.77 for blobs anywhere (2-d), 0.59 for blobs near the centre and 0.41 for maps that differ only by noise. 0.9 lies
above all the continua (in one of 48 runs, 200 maps on a line, the kNN graph itself fell apart into two components,
1.00: any kNN graph splits there)."""

_EPS = 1e-9  # eigenvalues below this are zero (a disconnected component) when forming relative gaps


@dataclass
class ClassClusters:
    """The SpRAy clusters of one class.

    Attributes:
        label: the class.
        index: ``[n]`` indices (into the input arrays) of this class's images.
        assignment: ``[n]`` cluster id of each image of the class, clusters numbered ``0..k-1``.
        eigenvalues: the smallest (up to ``max_clusters + 1``) eigenvalues of the normalised graph Laplacian,
            ascending; empty for a class too small to analyse.
        eigengap: the largest relative gap ``(lambda_k - lambda_{k-1}) / lambda_k``, k = 2..max_clusters, among
            those eigenvalues: the one that chose ``k`` when it is at least ``min_gap`` (see :data:`MIN_GAP`;
            ``nan`` for a class too small to analyse).
        mean_maps: ``[k, size, size]`` mean normalised heatmap of each cluster.
        tightness: ``[k]`` mean pairwise distance within the cluster / mean pairwise distance in the class (small:
            the maps are alike; ``nan`` for a cluster of one image).
        order: cluster ids, most suspicious first: ascending tightness, clusters of fewer than ``min_size`` images
            last.
    """

    label: int
    index: np.ndarray
    assignment: np.ndarray
    eigenvalues: np.ndarray
    eigengap: float
    mean_maps: np.ndarray
    tightness: np.ndarray
    order: np.ndarray

    @property
    def k(self) -> int:
        """The number of clusters."""
        return len(self.mean_maps)

    def members(self, cluster: int) -> np.ndarray:
        """Indices (into the input arrays) of the images in ``cluster``.

        Args:
            cluster: a cluster id, ``0..k-1``.
        """
        if not 0 <= cluster < self.k:
            raise IndexError(f"class {self.label} has {self.k} clusters, no cluster {cluster}")
        return self.index[self.assignment == cluster]

    def sizes(self) -> np.ndarray:
        """``[k]`` number of images in each cluster."""
        return np.bincount(self.assignment, minlength=self.k)


@dataclass
class Spray:
    """The SpRAy result: the clusters of every class.

    Attributes:
        classes: one :class:`ClassClusters` per class, in ascending label order.
        size: the side of the downsampled maps.
    """

    classes: list[ClassClusters]
    size: int

    def get(self, label: int) -> ClassClusters:
        """The clusters of class ``label``.

        Args:
            label: a class present in the labels given to :func:`spray`.
        """
        for c in self.classes:
            if c.label == label:
                return c
        raise KeyError(f"no class {label} in the SpRAy result (classes {[c.label for c in self.classes]})")

    def top(self, label: int) -> np.ndarray:
        """Members of the most suspicious cluster of class ``label`` (empty when the class has one cluster).

        Args:
            label: a class present in the labels given to :func:`spray`.
        """
        c = self.get(label)
        if c.k <= 1:
            return np.empty(0, dtype=np.int64)
        return c.members(int(c.order[0]))

    def summary(self) -> dict[str, float]:
        """Scalar metrics: ``spray_classes`` (classes analysed), ``spray_classes_split`` (classes with k > 1),
        ``spray_max_eigengap``, ``spray_min_tightness`` (the tightest top cluster of a split class; nan when none)."""
        gaps = [c.eigengap for c in self.classes if np.isfinite(c.eigengap)]
        split = [c for c in self.classes if c.k > 1]
        tight = [float(c.tightness[c.order[0]]) for c in split if np.isfinite(c.tightness[c.order[0]])]
        return {
            "spray_classes": float(len(self.classes)),
            "spray_classes_split": float(len(split)),
            "spray_max_eigengap": float(max(gaps)) if gaps else float("nan"),
            "spray_min_tightness": float(min(tight)) if tight else float("nan"),
        }


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of exact area averaging from ``n_in`` cells to ``n_out`` (rows sum to 1)."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    cells = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, cells + 1) - np.maximum(lo, cells), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def preprocess(maps: np.ndarray, size: int = 8) -> np.ndarray:
    """The maps as SpRAy compares them: positive part, area-averaged to ``size x size``, each summing to 1.

    Args:
        maps: ``[N, H, W]`` heatmaps (any H, W; non-finite values count as 0).
        size: the side of the downsampled maps.

    Returns:
        ``[N, size, size]`` float64; a map with no positive mass becomes uniform.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got shape {maps.shape}")
    pos = np.where(np.isfinite(maps), np.maximum(maps, 0.0), 0.0)
    rows, cols = _area_matrix(maps.shape[1], size), _area_matrix(maps.shape[2], size)
    small = np.einsum("ih,nhw,jw->nij", rows, pos, cols)
    mass = small.sum(axis=(1, 2), keepdims=True)
    uniform = np.full_like(small, 1.0 / (size * size))
    return np.where(mass > 0, small / np.where(mass > 0, mass, 1.0), uniform)


def _laplacian_spectrum(affinity, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` smallest eigenvalues (ascending) and eigenvectors of the normalised Laplacian
    ``I - D^-1/2 A D^-1/2``."""
    import scipy.sparse as sp

    degree = np.asarray(affinity.sum(axis=1)).ravel()
    d = sp.diags(1.0 / np.sqrt(degree))
    normed = d @ affinity @ d
    n = normed.shape[0]
    if n <= 2000:
        from scipy.linalg import eigh

        vals, vecs = eigh(normed.toarray(), subset_by_index=[n - m, n - 1])
    else:
        from scipy.sparse.linalg import eigsh

        vals, vecs = eigsh(normed, k=m, which="LA", tol=1e-8)
    order = np.argsort(-vals)
    return np.clip(1.0 - vals[order], 0.0, 2.0), vecs[:, order]


def _cluster_class(x: np.ndarray, *, n_neighbors: int, max_clusters: int, min_gap: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Cluster one class's flattened maps ``x`` [n, d]: (assignment, eigenvalues, eigengap)."""
    from sklearn.cluster import KMeans
    from sklearn.neighbors import kneighbors_graph

    n = len(x)
    knn = kneighbors_graph(x, n_neighbors=n_neighbors, mode="connectivity", include_self=False)
    affinity = (0.5 * (knn + knn.T)).tocsr()
    m = min(max_clusters + 1, n)
    eigenvalues, vectors = _laplacian_spectrum(affinity, m)
    # relative gap after the k-th smallest eigenvalue, k = 2..m-1 (for k = 1 it is 1 by construction: no evidence)
    gaps = np.array([(eigenvalues[k] - eigenvalues[k - 1]) / max(eigenvalues[k], _EPS) for k in range(2, m)])
    if len(gaps) == 0:
        return np.zeros(n, dtype=np.int64), eigenvalues, float("nan")
    best = int(np.argmax(gaps))
    eigengap = float(gaps[best])
    k = best + 2 if eigengap >= min_gap else 1
    if k == 1:
        return np.zeros(n, dtype=np.int64), eigenvalues, eigengap
    emb = vectors[:, :k]
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(emb)
    # renumber 0..k'-1 by first appearance (k-means may leave a cluster empty on degenerate data)
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse].astype(np.int64), eigenvalues, eigengap


def _mean_pairwise(x: np.ndarray) -> float:
    """Mean Euclidean distance over distinct pairs of rows of ``x`` (nan for fewer than 2 rows)."""
    n = len(x)
    if n < 2:
        return float("nan")
    sq = np.sum(x * x, axis=1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0, None)
    return float(np.sqrt(d2)[np.triu_indices(n, 1)].mean())


def spray(maps: np.ndarray, labels: np.ndarray, *, size: int = 8, n_neighbors: int = 10, max_clusters: int = 6,
          min_gap: float = MIN_GAP, min_size: int = 3, seed: int = 0) -> Spray:
    """Spectral Relevance Analysis of heatmaps, class by class.

    Args:
        maps: ``[N, H, W]`` heatmaps (relevance; only the positive part counts), or ``[N, D]`` relevance
            vectors, e.g. of a layer's channels (concepts), compared as they are (positive part, each summing to 1):
            the latent SpRAy of Reveal to Revise, which also finds an artifact that moves.
        labels: ``[N]`` class of each map (usually the predicted or the true class).
        size: side of the downsampled maps that are compared (the paper downsamples heavily, to see the layout of
            relevance rather than pixel detail).
        n_neighbors: neighbours of each map in the kNN affinity graph; a class with fewer than
            ``2 * n_neighbors`` images is not analysed (k=1, logged).
        max_clusters: the most clusters per class (>= 2); the eigengap is sought among the first
            ``max_clusters + 1`` eigenvalues.
        min_gap: a largest (relative) eigengap below this means one cluster, k=1; see :data:`MIN_GAP` for how it
            is measured and why the default.
        min_size: clusters of fewer images are ranked last in ``order`` (a handful of odd maps is no population).
        seed: random state of k-means; the result is deterministic for a given seed.

    Returns:
        A :class:`Spray` with one :class:`ClassClusters` per class, in ascending label order.
    """
    labels = np.asarray(labels).ravel()
    maps = np.asarray(maps)
    if len(labels) != len(maps):
        raise ValueError(f"{len(maps)} maps but {len(labels)} labels")
    if n_neighbors < 1 or size < 1 or max_clusters < 2:
        raise ValueError("n_neighbors and size must be >= 1, max_clusters >= 2")
    if maps.ndim == 2:  # relevance vectors (e.g. of a layer's concepts, as R2R clusters them): positive part, sum 1
        pos = np.where(np.isfinite(maps), np.maximum(maps, 0.0), 0.0).astype(np.float64)
        mass = pos.sum(1, keepdims=True)
        small = np.where(mass > 0, pos / np.where(mass > 0, mass, 1.0), 1.0 / max(pos.shape[1], 1))
    else:
        small = preprocess(maps, size)
    flat = small.reshape(len(small), -1)
    classes = []
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        x = flat[index]
        if len(index) < 2 * n_neighbors:
            log.info("SpRAy: class %s has %d images (< 2 * n_neighbors = %d): not clustered, k=1",
                     label, len(index), 2 * n_neighbors)
            assignment, eigenvalues, eigengap = np.zeros(len(index), dtype=np.int64), np.empty(0), float("nan")
        else:
            assignment, eigenvalues, eigengap = _cluster_class(
                x, n_neighbors=n_neighbors, max_clusters=max_clusters, min_gap=min_gap, seed=seed)
        k = int(assignment.max()) + 1 if len(assignment) else 0
        mean_maps = np.stack([small[index[assignment == c]].mean(axis=0) for c in range(k)]) if k else \
            np.empty((0, *small.shape[1:]))
        whole = _mean_pairwise(x)
        tightness = np.array([
            _mean_pairwise(x[assignment == c]) / whole if whole > 0 else 0.0 for c in range(k)
        ])
        sizes = np.bincount(assignment, minlength=k)
        key = np.where(np.isfinite(tightness), tightness, np.inf)
        order = np.lexsort((np.arange(k), key, sizes < min_size)).astype(np.int64)
        classes.append(ClassClusters(label=int(label), index=index, assignment=assignment,
                                     eigenvalues=eigenvalues, eigengap=eigengap, mean_maps=mean_maps,
                                     tightness=tightness, order=order))
    return Spray(classes=classes, size=size)


def spray_figure(result: Spray, path, class_names=None, max_clusters: int = 4) -> Path:
    """Write a PNG of the SpRAy clusters: one row per class, its cluster mean maps in ``order`` (most suspicious
    first), each titled with the cluster's size and tightness, the row labelled with the class and its eigengap.

    Args:
        result: the output of :func:`spray`.
        path: where to write the PNG (parent folders are created).
        class_names: optional names, a sequence indexed by label or a mapping label -> name.
        max_clusters: the most clusters shown per class.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = max(len(result.classes), 1)
    cols = max([min(c.k, max_clusters) for c in result.classes] + [1])
    fig = Figure(figsize=(1.9 * cols + 0.6, 2.0 * rows))
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for r, c in enumerate(result.classes):
        if class_names is None:
            name = str(c.label)
        elif isinstance(class_names, dict):
            name = str(class_names.get(c.label, c.label))
        else:
            name = str(class_names[c.label]) if c.label < len(class_names) else str(c.label)
        gap = f"{c.eigengap:.2f}" if np.isfinite(c.eigengap) else "n/a"
        axes[r, 0].set_ylabel(f"{name}\ngap {gap}, k={c.k}", fontsize=8)
        sizes = c.sizes()
        for j, cluster in enumerate(c.order[:max_clusters]):
            ax = axes[r, j]
            ax.set_frame_on(True)
            mean = c.mean_maps[cluster]
            ax.imshow(mean if mean.ndim == 2 else mean[None], cmap="inferno", interpolation="nearest",
                      aspect="auto")
            t = c.tightness[cluster]
            ax.set_title(f"n={sizes[cluster]}, t={t:.2f}" if np.isfinite(t) else f"n={sizes[cluster]}",
                         fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path
