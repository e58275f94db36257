"""Class Artifact Compensation: correct a model that uses an artifact, by its direction in a layer.

An artifact the model relies on (a corner tag, a band-aid, a watermark) is a direction in the
activations of a layer: its **concept activation vector** (CAV), computed here from a few labelled
samples as the *pattern* CAV of Pahde et al. (2022), the difference between the mean activation of
samples with and without the artifact (the covariance of activation and label over the label's
variance, which points along the artifact's signal rather than a discriminating filter's).

- **P-ClArC** (projective ClArC; Anders et al., "Finding and removing Clever Hans", Information
  Fusion 77, 2022) projects the direction out of the layer's output at every position,
  ``a <- a - v <v, a - z>``, with ``z`` the mean activation of samples without the artifact: the
  artifact's signal is replaced by what a clean sample would carry. No retraining.
- **RR-ClArC** (right-reason ClArC; Dreyer, Pahde et al., "From Hope to Safety: Unlearning Biases of
  Deep Models via Gradient Penalization in Latent Space", AAAI 2024) fine-tunes the model with a
  penalty on the output's gradient along the direction, ``lambda * <grad_a f, v>^2``, so that moving
  along the artifact no longer changes the decision; the network up to the layer is frozen, so the
  direction stays where the CAV found it.

Both take the artifacts one at a time (the iterations of Reveal-to-Revise, Pahde et al., MICCAI
2023): the CAV of artifact ``k`` is computed on the model already corrected for artifacts ``1..k-1``.
The corrected model is a copy; the projection is a forward hook of the copy's layer, with the
directions kept as buffers of that layer (so they are in its weights' digest and state dict).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.types import HarnessError, ImageSet
from harness.xai.base import network

log = logging.getLogger(__name__)
POOLS = ("max", "mean", "none")
VERSION = 4  # of the corrections' procedure: part of their cache key


def _channel_dim(a: torch.Tensor) -> int:
    """Channels of a feature map ``[N, C, H, W]`` are dim 1, of tokens ``[N, T, D]`` the last."""
    if a.ndim == 4:
        return 1
    if a.ndim == 3:
        return 2
    raise HarnessError(f"revise: the layer's output has shape {tuple(a.shape)}; a feature map [N, C, H, W] or "
                       "tokens [N, T, D] is needed")


def layer(model: nn.Module, name: str) -> nn.Module:
    """The module ``name`` of the model's network, or an error naming the setting."""
    net = network(model)
    try:
        return net.get_submodule(name)
    except AttributeError:
        raise HarnessError(f"revise.layer={name!r} is not a module of {type(net).__name__}") from None


@contextmanager
def captured(module: nn.Module, store: dict[str, torch.Tensor]) -> Iterator[None]:
    """While open, ``store["act"]`` is the module's latest output (with its graph)."""
    def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        store["act"] = out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def activations(model: nn.Module, module: nn.Module, x: torch.Tensor, pool: str = "max",
                batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's output per image pooled over positions (``max`` or ``mean``), ``[N, C]``, or
    flattened (``none``, ``[N, C*H*W]``), and unpooled, ``[N, C, H, W]`` (tokens ``[N, T, D]``),
    on the CPU."""
    if pool not in POOLS:
        raise HarnessError(f"revise.pool={pool!r} is not valid; valid: {', '.join(POOLS)}")
    pooled, full, store = [], [], {}
    with captured(module, store):
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
            a = store["act"].float().cpu()
            full.append(a)
            if pool == "none":  # the whole activation, one vector per image
                pooled.append(a.flatten(1))
                continue
            a = a.movedim(_channel_dim(a), 1).flatten(2)
            pooled.append(a.amax(2) if pool == "max" else a.mean(2))
    return torch.cat(pooled), torch.cat(full)


def pattern_cav(acts: torch.Tensor, has_artifact: torch.Tensor) -> torch.Tensor:
    """The unit pattern CAV, mean with minus mean without the artifact, normalised, from pooled
    activations ``[N, C]`` and boolean labels."""
    t = has_artifact.bool()
    if t.sum() < 1 or (~t).sum() < 1:
        raise HarnessError(f"revise: a CAV needs samples with and without the artifact ({int(t.sum())} with, "
                           f"{int((~t).sum())} without)")
    v = acts[t].mean(0) - acts[~t].mean(0)
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise HarnessError("revise: the artifact does not change the layer's pooled activations (a zero CAV)")
    return v / norm


def project(a: torch.Tensor, directions: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``a`` with the directions ``V`` (rows of ``directions``, ``[K, C]``) projected out together,
    along the channel dimension at every position: ``a <- a - V^T G^+ (V a - c)``, ``G = V V^T``,
    ``c_k = <v_k, z_k>`` with ``z_k`` (``means[k]``, shaped as one image's activation) the mean
    activation of samples without artifact ``k`` at that position. Afterwards ``<v_k, a> = c_k``
    for every ``k``; for one direction this is ``a - v <v, a - z>``. (Projecting them out one after
    the other would bring back part of an earlier one when the directions are not orthogonal.)
    Directions as long as a whole activation (``pool=none``) act on the flattened activation."""
    v = directions.to(a.dtype)
    gram_inv = torch.linalg.pinv(v @ v.T)
    if v.shape[1] == a[0].numel():
        flat = a.flatten(1)
        c = (v * means.to(a.dtype).flatten(1)).sum(1)  # [K]
        return (flat - ((flat @ v.T - c) @ gram_inv) @ v).view_as(a)
    dim = _channel_dim(a)
    last = a.movedim(dim, -1)  # [N, ..., C]
    z = means.to(a.dtype).movedim(dim, -1)  # [K, ..., C] (means has K where a has N)
    c = (z * v.view(len(v), *[1] * (z.ndim - 2), -1)).sum(-1).movedim(0, -1)  # [..., K]
    return (last - ((last @ v.T - c) @ gram_inv) @ v).movedim(-1, dim)


def _projection_hook(module: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
    return project(out, module.clarc_directions, module.clarc_means)


def with_projection(model: nn.Module, layer_name: str, directions: torch.Tensor, means: torch.Tensor) -> nn.Module:
    """A copy of ``model`` whose layer projects ``directions`` out of its output (P-ClArC); the
    directions join those of earlier corrections at that layer."""
    model = copy.deepcopy(model)
    module = layer(model, layer_name)
    if hasattr(module, "clarc_directions"):
        if module.clarc_directions.shape[1] != directions.shape[1]:
            raise HarnessError(f"revise: layer {layer_name} already projects directions of {module.clarc_directions.shape[1]} "
                               f"values, this one has {directions.shape[1]}: one revise.pool kind per layer")
        directions = torch.cat([module.clarc_directions, directions.to(module.clarc_directions)])
        means = torch.cat([module.clarc_means, means.to(module.clarc_means)])
    else:
        module.register_forward_hook(_projection_hook)
    device = next(model.parameters()).device
    module.register_buffer("clarc_directions", directions.float().to(device))
    module.register_buffer("clarc_means", means.float().to(device))
    return model


@dataclass
class Samples:
    """Labelled samples for one artifact: images ``x`` ``[N, 3, S, S]`` (network input) and whether
    each carries the artifact, and ``clean``, images of every class without it (for ``z``)."""

    x: torch.Tensor
    has_artifact: torch.Tensor
    clean: torch.Tensor


def labelled_samples(model: nn.Module, data: ImageSet, artifact: str, n_labelled: int, seed: int = 0) -> Samples:
    """Up to ``n_labelled`` images with the artifact and as many without it, the latter from the
    classes the artifact occurs in (so that the CAV does not also learn the class; from other
    classes where those run short, with a warning), drawn at
    random from ``data``, whose ``regions[artifact]`` says where the artifact is (the stand-in for
    a person who labels a few of the samples reveal points to)."""
    if artifact not in data.regions:
        raise HarnessError(f"revise: the labelled data has no region {artifact!r} (its regions: "
                           f"{', '.join(data.regions) or 'none'}); plant it with the data's artifacts settings")
    has = np.array([m.any() for m in data.regions[artifact]])
    if not has.any():
        raise HarnessError(f"revise: no image of the labelled data carries the artifact {artifact!r}")
    classes = np.unique(data.labels[has])
    rng = np.random.default_rng(seed)
    pos = rng.permutation(np.flatnonzero(has))[:n_labelled]
    same = rng.permutation(np.flatnonzero(~has & np.isin(data.labels, classes)))
    if len(same) < len(pos):  # too few without it in its classes: the rest from the other classes
        log.warning("revise: only %d images of the classes with %s lack it; %d more from other classes (the CAV "
                    "then also carries some of the class)", len(same), artifact, len(pos) - len(same))
        same = np.concatenate([same, rng.permutation(np.flatnonzero(~has & ~np.isin(data.labels, classes)))])
    neg = same[:len(pos)]
    idx = np.concatenate([pos, neg])
    x, _ = model.preprocess([data.images[i] for i in idx], None)
    clean = rng.permutation(np.flatnonzero(~has))[:4 * n_labelled]
    return Samples(x, torch.from_numpy(has[idx]), model.preprocess([data.images[i] for i in clean], None)[0])


def _end(net: nn.Module, module: nn.Module) -> int:
    """Position just after ``module`` and its submodules in the network's module order
    (registration order, depth first: the forward order of the usual networks)."""
    mods = list(net.modules())
    start = next(i for i, m in enumerate(mods) if m is module)
    return start + len(list(module.modules()))


def freeze_through(model: nn.Module, module: nn.Module) -> list[nn.Parameter]:
    """Stop gradients to every parameter of the modules up to and including ``module`` (and its
    submodules) in the network's module order, and to the network's own parameters (a ViT's
    position embedding), so that the layer's activations, where the CAV lives, stay as they were;
    a module without parameters (a ReLU) freezes what comes before it. Returns the parameters
    left to train."""
    net = network(model)
    before = {id(p) for m in list(net.modules())[:_end(net, module)] for p in m.parameters(recurse=False)}
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(id(p) not in before)
    return [p for p in params if id(p) not in before]


def _along(g: torch.Tensor, v: torch.Tensor, per_position: bool) -> torch.Tensor:
    """The gradient ``g`` at a layer along ``v``: per image over the whole activation (a direction
    of it, ``pool=none``), per position, or averaged over positions (a direction of channels)."""
    if v.numel() == g[0].numel():
        return g.flatten(1) @ v
    g = g.movedim(_channel_dim(g), 1).flatten(2)
    return (g.transpose(1, 2) @ v).flatten() if per_position else g.mean(2) @ v


def rr_finetune(model: nn.Module, directions: list[tuple[str, torch.Tensor]], batches: Any, *, epochs: int,
                lr: float, penalty: float, per_position: bool = False, seed: int = 0) -> dict[str, float]:
    """RR-ClArC in place: cross-entropy plus ``penalty * sum_directions mean_images <g, v>^2``, ``g``
    the gradient of the logits summed with random signs (every output in expectation) at the
    layer's output, averaged over positions for a direction of channels (``pool`` max or mean),
    per position (``per_position``), or whole for a direction of the whole activation (``none``).
    ``directions`` are ``(layer, v)``: the artifact of this iteration and those corrected before,
    so that a later iteration does not learn an earlier artifact back. The network up to the
    earliest of the layers is frozen and BatchNorm statistics are kept (the model stays in eval
    mode), so the directions stay valid while the layers after them learn to ignore them.
    ``batches(epoch)`` yields ``(x, y)``."""
    device = next(model.parameters()).device
    names = list(dict.fromkeys(name for name, _ in directions))
    modules = {name: layer(model, name) for name in names}
    first = min(names, key=lambda n: _end(network(model), modules[n]))
    trainable = freeze_through(model, modules[first])
    if not trainable:
        raise HarnessError(f"revise.layer={first!r} is the network's last layer: nothing after it to fine-tune")
    opt = torch.optim.Adam(trainable, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    stores: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    t0, ce_sum, rr_sum, n = time.perf_counter(), 0.0, 0.0, 0
    model.eval()
    try:
        with ExitStack() as stack:
            for name in names:
                stack.enter_context(captured(modules[name], stores[name]))
            for epoch in range(epochs):
                for x, y in batches(epoch):
                    logits = model(x.requires_grad_(True))  # the frozen part's output needs a graph
                    signs = torch.where(torch.rand(logits.shape, generator=gen) < 0.5, -1.0, 1.0).to(logits)
                    grads = torch.autograd.grad((logits * signs).sum(), [stores[m]["act"] for m in names],
                                                create_graph=True)
                    grad = dict(zip(names, grads))
                    rr = sum(_along(grad[m], v.to(device).float(), per_position).pow(2).mean() for m, v in directions)
                    ce = nn.functional.cross_entropy(logits, y)
                    loss = ce + penalty * rr
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    ce_sum, rr_sum = ce_sum + float(ce.detach()) * len(x), rr_sum + float(rr.detach()) * len(x)
                    n += len(x)
                log.info("RR-ClArC epoch %d/%d: cross-entropy %.3f, gradient penalty %.4g", epoch + 1, epochs,
                         ce_sum / max(n, 1), rr_sum / max(n, 1))
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return {"rr_cross_entropy": ce_sum / max(n, 1), "rr_penalty": rr_sum / max(n, 1),
            "rr_seconds": time.perf_counter() - t0}


class Reviser:
    """Base of the ``revise`` options: ``reviser(model) -> corrected copy``, one iteration per
    artifact in ``artifacts``, each iteration's result cached under
    ``<cache_dir>/models/<method>-<hash>`` by the digest of the model it starts from and the
    settings, like the models the harness trains.

    Args:
        artifacts: the artifacts to correct, in order: names of the labelled data's regions
            (``shapes``: ``corner``, ``bandaid``, ``watermark``). Empty: the model as it is.
        data: dataset config of the labelled samples (and RR-ClArC's training images);
            ``split`` and ``n`` are set here where the dataset has them.
        layer: the module whose output carries the direction (``auto``: CRP's default, a CNN's
            last module with a spatial map, a ViT's last-but-one block); a mapping
            ``artifact -> layer`` sets it per artifact (unnamed ones: ``auto``).
        pool: how the CAV sees the layer: ``max`` or ``mean`` over positions (a direction of
            channels, projected out at every position: for an artifact that moves), or ``none``
            (the whole activation: for one at a fixed place); a mapping ``artifact -> pool``
            sets it per artifact (unnamed ones: ``max``).
        n_labelled: samples with the artifact, and as many without, for each CAV.
        n_pool: images drawn (``val`` split) to find the labelled samples in.
        cache_dir: root of the harness cache (``null``: nothing cached).
        seed: seeds the choice of samples and the fine-tuning.
    """

    method = "revise"

    def __init__(self, artifacts: list[str] = (), data: Any = None, layer: str | Mapping[str, str] = "auto",
                 pool: str | Mapping[str, str] = "max",
                 n_labelled: int = 32, n_pool: int = 2000, cache_dir: str | None = None, seed: int = 0) -> None:
        for value in (pool.values() if isinstance(pool, dict) or hasattr(pool, "items") else [pool]):
            if value not in POOLS:
                raise HarnessError(f"revise.pool={value!r} is not valid; valid: {', '.join(POOLS)} (or a mapping "
                                   "artifact -> one of them)")
        if int(n_labelled) < 2:
            raise HarnessError(f"revise.n_labelled={n_labelled} is not valid: at least 2")
        if artifacts and data is None:
            raise HarnessError("revise.data is not set: the dataset config whose regions label the artifacts")
        self.artifacts = [artifacts] if isinstance(artifacts, str) else list(artifacts)
        self.data = data
        self.layer = dict(layer) if hasattr(layer, "items") else str(layer)
        self.pool = dict(pool) if hasattr(pool, "items") else str(pool)
        self.n_labelled, self.n_pool, self.cache_dir, self.seed = int(n_labelled), int(n_pool), cache_dir, int(seed)
        self.info: dict[str, float] = {}

    def pool_for(self, artifact: str) -> str:
        return self.pool.get(artifact, "max") if isinstance(self.pool, dict) else self.pool

    def settings(self, artifact: str | None = None) -> dict[str, Any]:
        """What, besides the starting model, decides ``artifact``'s iteration (its cache key):
        its own layer and pool, not those the mappings give other artifacts."""
        from harness.utils import to_plain

        skip = ("artifacts", "cache_dir", "info", "corrected", "layer", "pool")
        return {k: v for k, v in vars(self).items() if k not in skip} | {
            "data": to_plain(self.data), "method": self.method, "version": VERSION,
            "layer": self.layer.get(artifact, "auto") if isinstance(self.layer, dict) else self.layer,
            "pool": self.pool_for(artifact) if artifact else self.pool}

    def _dataset(self, split: str, n: int, offset: int = 0) -> ImageSet:
        """``revise.data`` with ``split`` and ``n`` set where it has them, and its ``seed`` moved
        on by ``offset`` where it has one (generated data: fresh images)."""
        from omegaconf import OmegaConf

        from harness.components import build

        node = OmegaConf.create(self.data) if not OmegaConf.is_config(self.data) else self.data.copy()
        for key, value in (("split", split), ("n", n)):
            if key in node:
                node[key] = value
        if offset and "seed" in node:
            node["seed"] = int(node["seed"]) + offset
        return build(node)

    def layer_name(self, model: nn.Module, artifact: str | None = None) -> str:
        """The layer for ``artifact`` (``layer`` may map artifacts to layers; unnamed: ``auto``)."""
        from harness.xai.crp import default_layer

        name = self.layer.get(artifact, "auto") if isinstance(self.layer, dict) else self.layer
        return default_layer(model) if name == "auto" else name

    def __call__(self, model: nn.Module) -> nn.Module:
        from pathlib import Path

        from harness.cache import digest, model_digest

        if not self.artifacts:
            return model
        for artifact in self.artifacts:  # a bad layer fails before any work
            layer(model, self.layer_name(model, artifact))
        labelled = None
        t0 = time.perf_counter()
        self.corrected: list[tuple[str, torch.Tensor]] = []  # (layer, direction) of each iteration so far
        for k, artifact in enumerate(self.artifacts):
            name = self.layer_name(model, artifact)
            key = digest(self.method, model_digest(model), self.settings(artifact) | {"layer": name}, artifact)[:12]
            folder = None if self.cache_dir is None else Path(self.cache_dir) / "models" / f"{self.method}-{key}"
            with _locked(folder):  # parallel jobs of a sweep: one computes, the others wait and load
                model, labelled = self._iteration(model, k, artifact, name, folder, labelled)
        self.info["revise_iterations"] = float(len(self.artifacts))
        self.info["revise_seconds"] = time.perf_counter() - t0
        model.info = {**getattr(model, "info", {}), **self.info}
        return model.eval()

    def _iteration(self, model: nn.Module, k: int, artifact: str, name: str, folder: Any,
                   labelled: ImageSet | None) -> tuple[nn.Module, ImageSet | None]:
        """Iteration ``k``: correct ``artifact`` at layer ``name``, or load that from ``folder``."""
        import json

        if folder is not None and (folder / "revised.pt").is_file():
            state = torch.load(folder / "revised.pt", map_location="cpu", weights_only=True)
            model = self._load(model, name, state)
            self.corrected.append((name, state["direction"]))
            self.info |= {k_: float(v) for k_, v in json.loads((folder / "meta.json").read_text())["info"].items()}
            log.info("revise %s, iteration %d (%s): loaded from %s", self.method, k + 1, artifact, folder)
            return model, labelled
        if labelled is None:
            labelled = self._dataset("val", self.n_pool)
        samples = labelled_samples(model, labelled, artifact, self.n_labelled, self.seed + k)
        pool = self.pool_for(artifact)
        acts, _ = activations(model, layer(model, name), samples.x.to(next(model.parameters()).device), pool)
        v = pattern_cav(acts, samples.has_artifact)
        z = activations(model, layer(model, name), samples.clean.to(next(model.parameters()).device), pool)[1].mean(0)
        scores = (acts @ v).numpy()
        info = {f"revise_cav_auc_{artifact}": _auc(scores, samples.has_artifact.numpy())}
        model, state, extra = self._correct(model, name, v, z)
        info |= {f"{k_}_{artifact}": v_ for k_, v_ in extra.items()}
        self.info |= info
        state["direction"] = v
        self.corrected.append((name, v))
        log.info("revise %s, iteration %d: %s corrected at %s (CAV from %d + %d samples, AUC %.3f)", self.method,
                 k + 1, artifact, name, int(samples.has_artifact.sum()), int((~samples.has_artifact).sum()),
                 info[f"revise_cav_auc_{artifact}"])
        if folder is not None:
            tmp = folder / f".revised.pt.{os.getpid()}.tmp"
            torch.save(state, tmp)
            (folder / "meta.json").write_text(json.dumps({"artifact": artifact, "iteration": k + 1, "layer": name,
                                                          **self.settings(artifact), "info": info}, indent=2,
                                                         default=str))
            tmp.replace(folder / "revised.pt")  # last: its presence means complete
        return model, labelled

    def _correct(self, model: nn.Module, name: str, v: torch.Tensor, z: torch.Tensor,
                 ) -> tuple[nn.Module, dict, dict[str, float]]:
        """The corrected copy, what to cache of it, and scores to log (suffixed with the artifact)."""
        raise NotImplementedError

    def _load(self, model: nn.Module, name: str, state: dict) -> nn.Module:
        raise NotImplementedError


@contextmanager
def _locked(folder: Any) -> Iterator[None]:
    """An exclusive lock on ``folder`` (created) while open; nothing without a folder."""
    if folder is None:
        yield
        return
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a sample with the artifact scores above one without (ties half)."""
    pos, neg = scores[labels.astype(bool)], scores[~labels.astype(bool)]
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


class PClArC(Reviser):
    """``revise=p_clarc``: project the artifact's direction out of the layer (no training)."""

    method = "p_clarc"

    def _correct(self, model: nn.Module, name: str, v: torch.Tensor, z: torch.Tensor,
                 ) -> tuple[nn.Module, dict, dict[str, float]]:
        return with_projection(model, name, v[None], z[None]), {"direction": v, "mean": z}, {}

    def _load(self, model: nn.Module, name: str, state: dict) -> nn.Module:
        return with_projection(model, name, state["direction"][None], state["mean"][None])


class RRClArC(Reviser):
    """``revise=rr_clarc``: fine-tune with the right-reason penalty along the direction.

    Args (besides :class:`Reviser`'s):
        epochs: passes over the training images.
        n_train: training images (``train`` split of ``data``; fresh ones each epoch where the
            data is generated from a ``seed``, which moves on by 1000 + epoch, away from the seeds
            the harness's own training used).
        batch_size: images per step.
        lr: Adam's learning rate.
        penalty: weight ``lambda`` of the gradient penalty against the cross-entropy.
    """

    method = "rr_clarc"

    def __init__(self, *args: Any, epochs: int = 5, n_train: int = 2000, batch_size: int = 64, lr: float = 1e-4,
                 penalty: float = 1e3, per_position: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.per_position = bool(per_position)
        self.epochs, self.n_train, self.batch_size = int(epochs), int(n_train), int(batch_size)
        self.lr, self.penalty = float(lr), float(penalty)

    def _correct(self, model: nn.Module, name: str, v: torch.Tensor, z: torch.Tensor,
                 ) -> tuple[nn.Module, dict, dict[str, float]]:
        from harness.utils import seeded

        model = copy.deepcopy(model)
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(self.seed)
        fresh = "seed" in self.data  # generated data: new images every epoch, as the harness trains

        def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            train = self._dataset("train", self.n_train, 1000 + epoch if fresh else 0)
            x, _ = model.preprocess(train.images, None)
            y = torch.from_numpy(train.labels)
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), self.batch_size):
                idx = perm[i:i + self.batch_size]
                yield x[idx].to(device), y[idx].to(device)

        with seeded(self.seed):
            scores = rr_finetune(model, [*self.corrected, (name, v)], batches, epochs=self.epochs, lr=self.lr,
                                 penalty=self.penalty, per_position=self.per_position, seed=self.seed)
        return model, {"state_dict": model.state_dict()}, scores

    def _load(self, model: nn.Module, name: str, state: dict) -> nn.Module:
        model = copy.deepcopy(model)
        model.load_state_dict(state["state_dict"])
        return model
