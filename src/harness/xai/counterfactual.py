"""Counterfactual explanations: what would have to change for the model to say another class.

Two generators, one interface (``generator(model, x, targets) -> counterfactual images``, all in
``[0, 1]`` pixel units):

:class:`FreeMCGCounterfactual` (Kim et al. 2025, the paper's second use of FreeMCG): the image is
noised part of the way along the diffusion (``strength``), then denoised with DDIM (Song et al.
2021); at every step the Tweedie estimate ``x0_hat`` is moved along the FreeMCG gradient of the
target class's log-probability, an ensemble estimate from forward passes only whose particles are
re-noised and re-denoised copies of ``x0_hat`` (so the step lies along the data manifold), with an
L1 pull back towards the input. Deviations from the authors' code (github.com/one-june/FreeMCG,
``generate_counterfactual``), which were chosen for an explicit per-pixel step size: the step is
``step_size * sqrt(1 - abar_t)`` times the gradient normalised to unit RMS per pixel (the authors
rescale it to the norm of the predicted noise and weight it by ``sqrt(abar_t abar_{t-1})``), and
the proximity pull is the L1 subgradient ``prox_weight * sign(x0_hat - x)``.

:class:`GradientCounterfactual` (Wachter, Mittelstadt & Russell 2018): the plain-gradient
baseline. Adam on the pixels, minimising ``-log p_target + prox_weight * |x' - x|_1`` (mean) until
the prediction flips (per image) or ``n_steps`` run out; it needs the model's gradients.

:func:`scores` gives the standard counterfactual scores (Guidotti 2022; Verma et al. 2020):
validity (share of counterfactuals the model assigns to the target), proximity (mean absolute
and L2 pixel change), realism (the denoiser's reconstruction error of the counterfactual: an image
off the data manifold is changed more by denoising) and validity after denoising (a change the
denoiser erases, as adversarial noise is, did not change what the image shows).

References:
    Kim et al., "Derivative-Free Diffusion Manifold-Constrained Gradient for Unified XAI", CVPR 2025.
    Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021.
    Wachter, Mittelstadt & Russell, "Counterfactual explanations without opening the black box",
    Harvard J. Law & Technology 31 (2018).
    Guidotti, "Counterfactual explanations and how to find them", Data Min. Knowl. Disc. 2022.
    Jeanneret, Simon & Jurie, "Diffusion models for counterfactual explanations", ACCV 2022.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from torch import nn

from harness.types import HarnessError
from harness.xai.base import image_seed
from harness.xai.freemcg import ensemble_weights

log = logging.getLogger(__name__)


def _check(name: str, value: float, lo: float, hi: float) -> float:
    v = float(value)
    if not lo <= v <= hi or not math.isfinite(v):
        raise HarnessError(f"generators.<name>.{name}={value!r} is not valid: a number in [{lo}, {hi}]")
    return v


def resolve_targets(target: str | int, logits: torch.Tensor, class_names: list[str]) -> torch.Tensor:
    """The class each image's counterfactual goes to: a class name or index (the same for all),
    ``next`` (the predicted class + 1, cyclic) or ``second`` (the second most likely class)."""
    pred = logits.argmax(1)
    if target == "next":
        return (pred + 1) % logits.shape[1]
    if target == "second":
        return logits.topk(2, dim=1).indices[:, 1]
    if isinstance(target, str) and target in class_names:
        return torch.full_like(pred, class_names.index(target))
    if isinstance(target, int) and 0 <= target < logits.shape[1]:
        return torch.full_like(pred, target)
    raise HarnessError(f"target={target!r} is not valid; valid: next, second, a class index, "
                       f"or one of {', '.join(class_names)}")


class FreeMCGCounterfactual:
    """FreeMCG-guided reverse diffusion (see the module docstring).

    Args:
        denoiser: a :class:`~harness.xai.freemcg.DiffusersDenoiser` (the diffusion model).
        n_particles: ensemble size of each gradient estimate (authors' code: 100).
        strength: share of the diffusion the input is noised to (authors' code: 0.4, i.e. step 400
            of 1000); more changes more.
        n_steps: DDIM steps over the whole schedule (authors' code: 100); ``strength * n_steps`` run.
        step_size: guidance step per DDIM step, in units of the step's noise std (see above).
        prox_weight: L1 pull towards the input per step (pixels of the model's [-1, 1] range).
        eta: DDIM stochasticity (0: deterministic given the starting noise).
        batch_size: particles per model / UNet call.
        seed: seeds the starting noise and the particles (per image, from its bytes).
    """

    def __init__(self, denoiser, n_particles: int = 100, strength: float = 0.4, n_steps: int = 100,
                 step_size: float = 0.5, prox_weight: float = 0.02, eta: float = 0.0, batch_size: int = 256,
                 seed: int = 0) -> None:
        if not hasattr(denoiser, "tweedie"):
            raise HarnessError("the denoiser of a FreeMCG counterfactual must be a diffusion model (xai/denoiser@denoiser=ddpm_shapes, "
                               "ddpm_cifar10 or diffusers): the reverse diffusion needs its noise predictions")
        if int(n_particles) < 2:
            raise HarnessError(f"generators.<name>.n_particles={n_particles!r} is not valid: at least 2")
        self.denoiser = denoiser
        self.n_particles = int(n_particles)
        self.strength = _check("strength", strength, 1e-3, 1.0)
        self.n_steps = int(_check("n_steps", n_steps, 1, 10_000))
        self.step_size = _check("step_size", step_size, 0.0, 100.0)
        self.prox_weight = _check("prox_weight", prox_weight, 0.0, 10.0)
        self.eta = _check("eta", eta, 0.0, 1.0)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def timesteps(self) -> list[int]:
        """The DDIM steps run, from the start (``strength`` of the schedule) down to 0."""
        if getattr(self.denoiser, "abar", None) is None:
            self.denoiser.load(torch.device("cpu"))  # the schedule comes with the model
        T = len(self.denoiser.abar)
        stride = max(1, T // self.n_steps)
        start = min(T - 1, round(self.strength * T))
        return list(range(start, -1, -stride))

    def model_cost(self) -> tuple[int, int]:
        """(model forwards, UNet forwards) per image."""
        n = len(self.timesteps())
        return n * self.n_particles, n * (self.n_particles + 1)

    def _gradient(self, model: nn.Module, x0: torch.Tensor, t: int, target: int, gen: torch.Generator) -> torch.Tensor:
        """FreeMCG estimate ``[C, H, W]`` at one image's Tweedie estimate ``x0`` (model range)."""
        J, a = self.n_particles, float(self.denoiser.abar[t])
        eps = torch.randn((J, *x0.shape), generator=gen).to(x0)
        z = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        parts = torch.cat([self.denoiser.tweedie(z[i : i + self.batch_size], t)[0]
                           for i in range(0, J, self.batch_size)])
        f = torch.cat([model((parts[i : i + self.batch_size] + 1) / 2) for i in range(0, J, self.batch_size)]).double()
        w = ensemble_weights(f[None], torch.tensor([target], device=f.device))[0]  # e_c - p_j: log p_c
        dx = (parts - parts.mean(0)).double()
        return (torch.einsum("j,jchw->chw", w, dx) / (J - 1)).to(x0.dtype)

    @torch.no_grad()
    def __call__(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from tqdm.auto import tqdm

        d = self.denoiser
        d.load(x.device)
        steps = self.timesteps()
        out = []
        t0, every = time.perf_counter(), max(1, len(x) // 8)
        for i, (img, target) in enumerate(tqdm(list(zip(x, targets.tolist())), desc="FreeMCG counterfactuals",
                                               disable=None)):
            if i and i % every == 0:  # a line now and then reaches the job's log, terminal or not
                el = time.perf_counter() - t0
                log.info("counterfactual %d/%d, %.0f s, about %.0f s left", i, len(x), el, el / i * (len(x) - i))
            gen = torch.Generator().manual_seed(image_seed(self.seed, img))
            y = 2 * img[None].float() - 1
            a = float(d.abar[steps[0]])
            xt = math.sqrt(a) * y + math.sqrt(1 - a) * torch.randn(y.shape, generator=gen).to(y)
            for k, t in enumerate(steps):
                a = float(d.abar[t])
                a_prev = float(d.abar[steps[k + 1]]) if k + 1 < len(steps) else 1.0
                x0, _ = d.tweedie(xt, t)
                g = self._gradient(model, x0[0], t, target, gen)[None]
                g = g / g.pow(2).mean().sqrt().clamp_min(1e-12)
                x0 = x0 + self.step_size * math.sqrt(1 - a) * g - self.prox_weight * torch.sign(x0 - y)
                x0 = x0.clamp(-1, 1)
                eps = (xt - math.sqrt(a) * x0) / math.sqrt(1 - a)
                s2 = self.eta**2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
                xt = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - s2, 0.0)) * eps
                if s2 > 0:
                    xt = xt + math.sqrt(s2) * torch.randn(xt.shape, generator=gen).to(xt)
            out.append(((xt + 1) / 2).clamp(0, 1)[0].to(x.dtype))
        return torch.stack(out) if out else x.clone()

    def __repr__(self) -> str:
        return (f"FreeMCGCounterfactual(n_particles={self.n_particles}, strength={self.strength}, "
                f"n_steps={self.n_steps}, step_size={self.step_size}, prox_weight={self.prox_weight})")


class GradientCounterfactual:
    """Plain-gradient counterfactuals (Wachter et al. 2018; see the module docstring).

    Args:
        n_steps: Adam steps at most; an image stops changing once the model predicts the target.
        lr: Adam's step size (pixel units).
        prox_weight: weight of the mean L1 distance to the input in the loss.
    """

    def __init__(self, n_steps: int = 200, lr: float = 0.01, prox_weight: float = 0.1) -> None:
        self.n_steps = int(_check("n_steps", n_steps, 1, 100_000))
        self.lr = _check("lr", lr, 1e-6, 10.0)
        self.prox_weight = _check("prox_weight", prox_weight, 0.0, 1e3)

    def model_cost(self) -> tuple[int, int]:
        """(model forwards and backwards, UNet forwards) per image, at most."""
        return self.n_steps, 0

    def __call__(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        xc = x.detach().clone().requires_grad_(True)
        out = x.detach().clone()
        opt = torch.optim.Adam([xc], lr=self.lr)
        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        with torch.enable_grad():
            for step in range(self.n_steps + 1):
                logits = model(xc)
                flipped = active & (logits.argmax(1) == targets)
                out[flipped] = xc.detach()[flipped]  # kept as it was when it flipped (Adam's momentum moves on)
                active &= ~flipped
                out[active] = xc.detach()[active]
                if not active.any() or step == self.n_steps:
                    break
                logp = logits.log_softmax(1).gather(1, targets[:, None])[:, 0]
                dist = (xc - x).abs().flatten(1).mean(1)
                loss = ((-logp + self.prox_weight * dist) * active).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    xc.clamp_(0, 1)
        return out

    def __repr__(self) -> str:
        return f"GradientCounterfactual(n_steps={self.n_steps}, lr={self.lr}, prox_weight={self.prox_weight})"


@torch.no_grad()
def reconstruction_error(denoiser, x: torch.Tensor, sigma: float, seed: int = 0) -> np.ndarray:
    """Per image: mean squared change ``D(x + sigma eps, sigma) - x`` (pixel units) over one seeded
    noise draw. Real images of the denoiser's data score low; off-manifold images score higher."""
    g = torch.Generator().manual_seed(seed)
    noisy = x + sigma * torch.randn(x.shape, generator=g).to(x)
    out = torch.cat([denoiser(noisy[i : i + 256], sigma) for i in range(0, len(x), 256)])
    return (out - x).pow(2).flatten(1).mean(1).cpu().numpy()


@torch.no_grad()
def tangent_residual(denoiser, x: torch.Tensor, g: torch.Tensor, sigma: float, h: float = 0.5) -> np.ndarray:
    """Per image: ``|u - J u| / |u|`` for the unit direction ``u = g / |g|``, with ``J`` the Jacobian
    of the denoiser ``D(., sigma)`` at ``x`` (central finite difference of step ``h``).

    A Tweedie denoiser's Jacobian is (close to) the projection onto the tangent space of the data
    manifold (Chung et al. 2022; Kadkhodaie et al. 2024): 0 means ``g`` lies in that space (it
    changes the image the way the data vary), 1 means the denoiser removes all of it (noise-like,
    off the manifold)."""
    u = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    ju = (denoiser(x + h * u, sigma) - denoiser(x - h * u, sigma)) / (2 * h)
    return (u - ju).flatten(1).norm(dim=1).cpu().numpy()


@torch.no_grad()
def scores(model: nn.Module, denoiser, x: torch.Tensor, x_cf: torch.Tensor, targets: torch.Tensor,
           sigma: float = 0.15, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-image counterfactual scores (see the module docstring)."""
    pred = model(x_cf).argmax(1)
    denoised = torch.cat([denoiser(x_cf[i : i + 256], sigma) for i in range(0, len(x_cf), 256)])
    diff = (x_cf - x).flatten(1)
    return {
        "validity": (pred == targets).float().cpu().numpy(),
        "validity_denoised": (model(denoised).argmax(1) == targets).float().cpu().numpy(),
        "proximity_l1": diff.abs().mean(1).cpu().numpy(),
        "proximity_l2": diff.norm(dim=1).cpu().numpy(),
        "realism_error": reconstruction_error(denoiser, x_cf, sigma, seed),
    }
