"""FreeMCG: a black-box, manifold-constrained gradient from an ensemble of model outputs.

The method (Kim et al. 2025), as implemented here for one image ``x`` and target class ``c``:

1. **Spread particles.** Draw ``J`` Gaussian perturbations ``z_j = x + sigma * eps_j`` (pixel units,
   ``eps_j ~ N(0, I)``). This is the forward diffusion of ``x`` to the time ``t`` whose noise level is
   ``sigma``.
2. **Project onto the manifold** (only with a ``denoiser``). Each particle is replaced by the
   denoiser's Tweedie estimate ``x_j = D(z_j, sigma) ~= E[x_0 | x_t = z_j]``. A denoiser's Jacobian
   is (close to) the projection onto the tangent space of the data manifold, so the cloud
   ``{x_j}`` spreads along the manifold, not across it. Without a denoiser ``x_j = z_j``.
3. **Evaluate the model**, forward passes only: ``f_j = f(x_j)`` (logits, ``[J, K]``).
4. **Ensemble (Kalman) gradient.** With the ensemble means ``x_bar``, ``f_bar`` and the gradient of
   the explained score with respect to the logits at each particle, ``v_j`` (``e_c - softmax(f_j)``
   for ``log_softmax``, the paper's choice; ``e_c`` for ``logit``), the estimate is

       g = 1 / ((J - 1) sigma^2) * sum_j (x_j - x_bar) <f_j - f_bar, v_j>  ~=  C_xx grad_x s / sigma^2

   the ensemble cross-covariance ``C_xf`` applied to ``v``, as in the update of ensemble Kalman
   inversion: by statistical linearisation ``C_xf ~= C_xx J_f^T``, so the update is the gradient
   preconditioned by the particle covariance, obtained without a single derivative of the model.
   Without a denoiser ``C_xx = sigma^2 I`` and ``g`` is an unbiased (Stein's lemma) estimate of the
   Gaussian-smoothed gradient ``E[grad s(x + sigma eps)]`` (for ``logit``). With a denoiser
   ``C_xx ~= sigma^2 P`` where ``P`` is the denoiser's Jacobian (the tangent projection), so
   ``g ~= P grad s``: the gradient constrained to the manifold, FreeMCG proper.

The attribution map is built from the estimate (``attribution``): ``input_x_gradient`` =
``(x - baseline) * g`` summed over channels (the default), ``gradient`` = signed channel sum, or
``abs`` = max over colour channels of ``|g|``, as saliency maps are shown. The estimate's error
shrinks only as ``sqrt(pixels / particles)``; signed maps let that noise cancel in the region
sums faithfulness metrics take, ``abs`` does not (on the shapes ViT with 100 particles, SRG 0.54
for ``input_x_gradient`` and -0.05, i.e. random, for ``abs``).

What each part needs:
    * the model: a callable ``[N, 3, H, W]`` in ``[0, 1]`` -> logits ``[N, K]``; forward passes only
      (run under ``torch.no_grad``), so non-differentiable / black-box models work;
      ``n_particles`` passes per image (see :meth:`FreeMCG.model_cost`);
    * the denoiser (optional): any object following :class:`Denoiser`; it decides the manifold.
      :class:`DiffusersDenoiser` wraps a diffusion UNet on local disk (the paper's setting), e.g. the
      DDPM the harness trains for the data (:mod:`harness.xai.diffusion`, ``xai/denoiser=ddpm_shapes``,
      the default). :class:`WienerDenoiser` is the exact Tweedie
      denoiser of a stationary Gaussian (1/f^alpha) image prior: it runs offline with no weights,
      but it is a classical smoothing prior, *not* a diffusion model.

Deviations from the paper (see each class for details): the paper's public code applies FreeMCG
inside a reverse-diffusion loop to make counterfactuals (many denoising steps, gradient
renormalised to the noise norm; here :mod:`harness.xai.counterfactual`); for attribution we
compute one ensemble estimate at the input, at one diffusion time (step 300 of 1000 by default, as
pnpxai's ``Gfgp``), with each particle's softmax in ``e_c - p`` (pnpxai: the clean image's;
``experiments/benchmarks/freemcg_pnpxai.py`` shows that this is the only difference), no
iterations, and divided by ``(J - 1) sigma^2`` instead of renormalised, so the map has the scale
of a gradient and the no-denoiser case is an exact smoothed-gradient estimator.

References:
    Kim, Chung, Kim, Lee, Sim & Ye, "Derivative-Free Diffusion Manifold-Constrained Gradient for
    Unified XAI", CVPR 2025 (arXiv:2411.15265).
    Iglesias, Law & Stuart, "Ensemble Kalman methods for inverse problems", Inverse Problems 29
    (2013) 045001.
    Kovachki & Stuart, "Ensemble Kalman inversion: a derivative-free technique for machine learning
    tasks", Inverse Problems 35 (2019) 095005.
    Chung, Sim, Ryu & Ye, "Improving Diffusion Models for Inverse Problems using Manifold
    Constraints", NeurIPS 2022 (Tweedie denoising as a projection onto the manifold).
    Efron, "Tweedie's formula and selection bias", JASA 106 (2011).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from harness.types import HarnessError
from harness.xai.base import Explainer, ModelCost, check_fill, fill_like, image_seed


@runtime_checkable
class Denoiser(Protocol):
    """What FreeMCG needs from a denoiser (the manifold projection).

    ``denoiser(x_t, sigma) -> x0_hat``:
        x_t: ``[B, C, H, W]`` float tensor on the model's device, a clean image in ``[0, 1]`` pixel
            units plus Gaussian noise of standard deviation ``sigma`` (``x_t = x_0 + sigma * eps``,
            the variance-exploding form; a variance-preserving model converts, see
            :class:`DiffusersDenoiser`).
        sigma: the noise standard deviation in pixel units (``xai.sigma``).
        returns: the Tweedie / posterior-mean estimate ``E[x_0 | x_t]`` of the clean images, same
            shape, in ``[0, 1]`` pixel units, on ``x_t``'s device.

    It must be deterministic (FreeMCG's determinism and batch invariance rest on it) and treat the
    images of a batch independently. It is called ``batch_size`` particles at a time under
    ``torch.no_grad``.
    """

    def __call__(self, x_t: torch.Tensor, sigma: float) -> torch.Tensor: ...


class FreeMCG(Explainer):
    """Derivative-free (diffusion-)manifold-constrained gradient attribution (FreeMCG).

    See the module docstring for the algorithm. Each image gets its own particles, seeded from
    ``seed`` and the image's bytes, so a map does not depend on the batch it was computed in.

    References:
        Kim et al., "Derivative-Free Diffusion Manifold-Constrained Gradient for Unified XAI",
        CVPR 2025 (arXiv:2411.15265).
        Iglesias, Law & Stuart, "Ensemble Kalman methods for inverse problems", 2013.
        Kovachki & Stuart, "Ensemble Kalman inversion: a derivative-free technique for machine
        learning tasks", 2019.

    Args:
        n_particles: ensemble size ``J`` (>= 2); the model is run on ``J`` images per explained
            image. The estimate's error falls like ``sqrt(d_eff / J)`` with ``d_eff`` the number
            of directions the particles span (all pixels without a denoiser).
        sigma: particle noise standard deviation in pixel units ([0, 1] images); with a denoiser,
            the noise level (diffusion time) the particles are noised to before denoising.
        output: the score whose gradient is estimated: ``log_softmax`` (``log p_c``; the paper's
            ``C_xx grad f (e_c - p)``), ``logit`` (``f_c``) or ``softmax`` (``p_c``).
        attribution: ``input_x_gradient`` (``(x - baseline) * g``, channel sum), ``gradient``
            (signed channel sum) or ``abs`` (max over channels of ``|g|``).
        baseline: reference for ``input_x_gradient``: ``model_mean``, ``mean`` or a pixel value.
        denoiser: ``None`` (Gaussian particles: a black-box smoothed-gradient estimate) or a
            :class:`Denoiser` (particles projected onto its manifold: FreeMCG proper).
        batch_size: images (particles) per model / denoiser call.
        seed: base seed of the particle noise.
    """

    needs_gradients = False
    OUTPUTS = ("log_softmax", "logit", "softmax")
    ATTRIBUTIONS = ("abs", "gradient", "input_x_gradient")

    def __init__(self, n_particles: int = 100, sigma: float = 0.62, output: str = "log_softmax",
                 attribution: str = "input_x_gradient", baseline: float | str = "model_mean",
                 denoiser: Denoiser | None = None, batch_size: int = 256, seed: int = 0) -> None:
        if output not in self.OUTPUTS:
            raise HarnessError(f"xai.output={output!r} is not valid; valid: {', '.join(self.OUTPUTS)}")
        if attribution not in self.ATTRIBUTIONS:
            raise HarnessError(f"xai.attribution={attribution!r} is not valid; valid: "
                               f"{', '.join(self.ATTRIBUTIONS)}")
        if int(n_particles) < 2:
            raise HarnessError(f"xai.n_particles={n_particles!r} is not valid: an ensemble covariance "
                               "needs at least 2 particles")
        if not float(sigma) > 0 or not math.isfinite(float(sigma)):
            raise HarnessError(f"xai.sigma={sigma!r} is not valid: a positive noise level in pixel units")
        if int(batch_size) < 1:
            raise HarnessError(f"xai.batch_size={batch_size!r} is not valid: a positive integer")
        if denoiser is not None and not callable(denoiser):
            raise HarnessError(f"xai.denoiser={denoiser!r} is not valid: null or a callable "
                               "denoiser(x_t, sigma) -> x0 (e.g. harness.xai.freemcg.DiffusersDenoiser)")
        self.n_particles = int(n_particles)
        self.sigma = float(sigma)
        self.output = output
        self.attribution = attribution
        self.baseline = check_fill(baseline, "xai.baseline")
        self.denoiser = denoiser
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def model_cost(self, image_size: tuple[int, int]) -> ModelCost:
        """``n_particles`` forward passes per image, and as many through the denoiser (if any)."""
        return ModelCost(forward=float(self.n_particles),
                         denoiser=float(self.n_particles) if self.denoiser is not None else 0.0)

    # -- the estimator -------------------------------------------------------------------------

    def _noise(self, img: torch.Tensor) -> torch.Tensor:
        """``[J, C, H, W]`` standard normal draws seeded by the seed and the image's bytes."""
        g = torch.Generator().manual_seed(image_seed(self.seed, img.detach().cpu()))
        return torch.randn((self.n_particles, *img.shape), generator=g).to(img)

    def _chunked(self, fn, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])

    def _denoise(self, z: torch.Tensor) -> torch.Tensor:
        def call(chunk: torch.Tensor) -> torch.Tensor:
            out = self.denoiser(chunk, self.sigma)
            if not isinstance(out, torch.Tensor) or out.shape != chunk.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise HarnessError(f"xai.denoiser returned {got} for input {tuple(chunk.shape)}; "
                                   "it must return denoised images of the input's shape")
            return out.to(chunk)

        return self._chunked(call, z)

    @torch.no_grad()
    def estimate_gradient(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The FreeMCG gradient estimate ``[N, C, H, W]`` of the ``output`` score of ``targets``."""
        J = self.n_particles
        per_call = max(1, self.batch_size // J)  # whole images per group: memory ~ max(batch_size, J)
        acc = _accumulator(x.device)
        out = []
        for s in range(0, len(x), per_call):
            xs, ts = x[s : s + per_call], targets[s : s + per_call]
            z = xs[:, None] + self.sigma * torch.stack([self._noise(img) for img in xs])
            parts = z.reshape(-1, *x.shape[1:])
            if self.denoiser is not None:
                parts = self._denoise(parts)
            logits = self._chunked(lambda b: model(b).detach(), parts).to(acc)
            w = ensemble_weights(logits.reshape(len(xs), J, -1), ts, self.output)  # [G, J]
            parts = parts.reshape(len(xs), J, -1).to(acc)
            dx = parts - parts.mean(1, keepdim=True)
            g = torch.einsum("gj,gjd->gd", w, dx) / ((J - 1) * self.sigma**2)
            out.append(g.reshape(xs.shape).to(x.dtype))
        return torch.cat(out) if out else torch.zeros_like(x)

    def explain(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        g = self.estimate_gradient(model, x, targets)
        if self.attribution == "abs":
            return g.abs().amax(1)
        if self.attribution == "gradient":
            return g.sum(1)
        return ((x - fill_like(model, x, self.baseline, "xai.baseline")) * g).sum(1)


def ensemble_weights(f: torch.Tensor, t: torch.Tensor, output: str = "log_softmax") -> torch.Tensor:
    """``<f_j - f_bar, v_j>`` for logits ``f`` ``[G, J, K]`` and targets ``t`` ``[G]``: ``v_j`` is the
    gradient of the ``output`` score of the target with respect to the logits at particle ``j``
    (``e_c - softmax(f_j)`` for ``log_softmax``, ``e_c`` for ``logit``, ``p_c (e_c - p)`` for
    ``softmax``)."""
    df = f - f.mean(1, keepdim=True)
    idx = t.view(-1, 1, 1).expand(-1, f.shape[1], 1)
    if output == "logit":
        return df.gather(2, idx)[..., 0]
    p = f.softmax(-1)
    v = -p
    v.scatter_add_(2, idx, torch.ones_like(p[..., :1]))  # e_c - p
    w = (df * v).sum(-1)
    return w * p.gather(2, idx)[..., 0] if output == "softmax" else w


def _accumulator(device: torch.device) -> torch.dtype:
    """float64 for the ensemble sums, except where the device has none (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


# -- denoisers ---------------------------------------------------------------------------------


def check_denoiser_data(denoiser, class_names: list[str], option: str = "xai/denoiser") -> None:
    """Refuse a denoiser trained on images of other classes than ``class_names``: its manifold is
    not theirs. Denoisers that do not know their data (no ``class_names``) pass."""
    trained_on = getattr(denoiser, "class_names", None)
    if trained_on is not None and list(trained_on) != list(class_names):
        raise HarnessError(f"the denoiser was trained on other data (classes {', '.join(trained_on)}) than the "
                           f"images explained (classes {', '.join(class_names)}): its manifold is not theirs. "
                           f"Choose the denoiser of this data ({option}=ddpm_shapes | ddpm_cifar10 | diffusers "
                           f"with a model_path), or {option}=none for none")


def no_denoiser() -> None:
    """``xai/denoiser=none``: no manifold projection (FreeMCG's plain Gaussian particles)."""


class WienerDenoiser:
    """Exact Tweedie denoiser of a stationary Gaussian image prior (a Wiener filter).

    Not a diffusion model: a classical, hand-set model of natural images, usable offline with no
    weights. Each colour channel is a Gaussian field with power spectrum
    ``S(f) = A / (|f|^2 + f0^2)^(alpha/2)`` (``f`` in cycles per pixel, ``f0 = 1 / max(H, W)``),
    ``A`` set so that the per-pixel standard deviation is ``prior_std``, and an uninformative
    mean (the image mean passes unchanged). For that prior the posterior mean is exact:
    ``E[x_0 | x_t] = F^-1[ S / (S + sigma^2) * F[x_t] ]``. Its Jacobian is a soft projection
    onto low spatial frequencies, so FreeMCG with it gives a gradient constrained to smooth image
    variations (``g ~= G^2 grad``, ``G`` the filter), a crude stand-in for the image manifold.

    References:
        Wiener, "Extrapolation, Interpolation, and Smoothing of Stationary Time Series", 1949.
        Field, "Relations between the statistics of natural images and the response properties of
        cortical cells", JOSA A 4 (1987) (1/f amplitude spectra of natural images).
        Efron, "Tweedie's formula and selection bias", JASA 2011.

    Args:
        alpha: spectral exponent of the power spectrum (about 2 for natural images).
        prior_std: per-pixel standard deviation of the prior in pixel units.
    """

    def __init__(self, alpha: float = 2.0, prior_std: float = 0.25) -> None:
        if not float(alpha) >= 0:
            raise HarnessError(f"xai.denoiser.alpha={alpha!r} is not valid: a spectral exponent >= 0")
        if not float(prior_std) > 0:
            raise HarnessError(f"xai.denoiser.prior_std={prior_std!r} is not valid: a positive std")
        self.alpha = float(alpha)
        self.prior_std = float(prior_std)

    def gain(self, h: int, w: int, sigma: float) -> torch.Tensor:
        """The filter ``S / (S + sigma^2)`` on the ``rfft2`` grid ``[h, w // 2 + 1]`` (float64)."""
        f0 = 1.0 / max(h, w)
        fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
        shape_full = (fy**2 + torch.fft.fftfreq(w, dtype=torch.float64)[None] ** 2 + f0**2) ** (-self.alpha / 2)
        shape_full[0, 0] = 0.0  # the mean is not part of the prior's variance
        amp = self.prior_std**2 * h * w / shape_full.sum().clamp_min(1e-300)
        spec = amp * (fy**2 + torch.fft.rfftfreq(w, dtype=torch.float64)[None] ** 2 + f0**2) ** (-self.alpha / 2)
        g = spec / (spec + float(sigma) ** 2)
        g[0, 0] = 1.0
        return g

    def __call__(self, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
        h, w = x_t.shape[-2:]
        acc = _accumulator(x_t.device)
        g = self.gain(h, w, sigma).to(device=x_t.device, dtype=acc)
        out = torch.fft.irfft2(torch.fft.rfft2(x_t.to(acc)) * g, s=(h, w))
        return out.to(x_t.dtype)

    def __repr__(self) -> str:
        return f"WienerDenoiser(alpha={self.alpha}, prior_std={self.prior_std})"


class DiffusersDenoiser:
    """Tweedie denoising with a pretrained ``diffusers`` UNet2DModel (the paper's manifold).

    Loads ``UNet2DModel`` and a DDPM-type scheduler (only its ``alphas_cumprod`` and
    ``prediction_type`` are used) from a local folder, as written by ``pipeline.save_pretrained``
    (``unet/`` and ``scheduler/`` subfolders) or a bare model folder (``config.json`` plus
    ``scheduler_config.json``). Nothing is downloaded: copy the weights there on a machine with hub
    access (e.g. ``DDPMPipeline.from_pretrained("google/ddpm-cifar10-32").save_pretrained(path)``
    for 32x32 images; the paper used OpenAI's 256x256 unconditional ImageNet model, which is not in
    diffusers format). :func:`harness.xai.diffusion.ddpm_denoiser` trains one for a harness dataset
    and returns it as this class; its ``meta.json`` (training time, held-out denoising error, the
    classes it was trained on) becomes :attr:`info`.

    Conversion: a pixel-space ``x_t = x_0 + sigma * eps`` is mapped to the model's ``[-1, 1]``
    range (noise ``2 sigma``), the timestep ``t`` whose variance-preserving noise-to-signal ratio
    ``sqrt((1 - abar_t) / abar_t)`` is closest to ``2 sigma`` is chosen, the input is scaled by
    ``sqrt(abar_t)``, and Tweedie's formula gives ``x0 = (x_t - sqrt(1 - abar_t) eps_hat) /
    sqrt(abar_t)`` (or the ``v_prediction`` / ``sample`` equivalents), clipped to ``[-1, 1]`` as in
    the paper's code and mapped back to ``[0, 1]``.

    References:
        Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020.
        Kim et al., "Derivative-Free Diffusion Manifold-Constrained Gradient for Unified XAI", 2025.

    Args:
        model_path: local folder with the UNet and scheduler configs and weights.
        resize: ``False`` runs the (fully convolutional) UNet at the input size, which must be
            divisible by its downsampling factor; ``True`` resamples particles (bilinear) to the
            UNet's ``sample_size`` and back. Resampling changes the noise statistics the UNet sees,
            so prefer a UNet trained at the classifier's input size.
        clip: clip the Tweedie estimate to the data range.
        dtype: ``float32``, ``float16`` or ``bfloat16`` for the UNet.
    """

    DTYPES = ("float32", "float16", "bfloat16")

    def __init__(self, model_path: str, resize: bool = False, clip: bool = True,
                 dtype: str = "float32") -> None:
        path = Path(str(model_path)).expanduser()
        if not path.is_dir():
            raise HarnessError(
                f"xai.denoiser.model_path={str(model_path)!r} is not a folder. DiffusersDenoiser needs a "
                "diffusers UNet2DModel and its scheduler on local disk (weights cannot be downloaded "
                "here): on a machine with hub access run e.g. DDPMPipeline.from_pretrained(<model id>)"
                ".save_pretrained(<folder>) and copy the folder here")
        unet_dir = path / "unet" if (path / "unet").is_dir() else path
        sched_dir = path / "scheduler" if (path / "scheduler").is_dir() else path
        missing = [str(p) for p in (unet_dir / "config.json", sched_dir / "scheduler_config.json") if not p.is_file()]
        if missing:
            raise HarnessError(f"xai.denoiser.model_path={str(model_path)!r} is not a diffusers model folder: "
                               f"missing {', '.join(missing)}")
        if dtype not in self.DTYPES:
            raise HarnessError(f"xai.denoiser.dtype={dtype!r} is not valid; valid: {', '.join(self.DTYPES)}")
        meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
        #: what the run logs as ``summary.denoiser_*`` (numbers of meta.json)
        self.info = {k: float(v) for k, v in meta.items() if isinstance(v, (int, float))}
        #: the classes of the images it was trained on, where known (checked against the data explained)
        self.class_names = meta.get("class_names")
        self.model_path = str(path)
        self.resize = bool(resize)
        self.clip = bool(clip)
        self.dtype = dtype
        self._unet_dir, self._sched_dir = unet_dir, sched_dir
        self._unet = None
        self.abar: torch.Tensor | None = None  # the schedule's cumulative alphas, once loaded

    def load(self, device: torch.device) -> None:
        """Load the UNet and schedule (once) and put the UNet on ``device``."""
        if self._unet is None:
            from diffusers import DDPMScheduler, UNet2DModel

            dtype = getattr(torch, self.dtype)
            unet = UNet2DModel.from_pretrained(str(self._unet_dir), local_files_only=True, torch_dtype=dtype,
                                               low_cpu_mem_usage=False)
            sched = DDPMScheduler.from_pretrained(str(self._sched_dir), local_files_only=True)
            self._unet = unet.eval().requires_grad_(False)
            self.abar = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64)
            self._pred = sched.config.prediction_type
            if self._pred not in ("epsilon", "v_prediction", "sample"):
                raise HarnessError(f"DiffusersDenoiser: prediction_type={self._pred!r} is not supported "
                                   "(epsilon, v_prediction, sample)")
        self._unet.to(device=device)

    def timestep(self, sigma: float) -> int:
        """The diffusion step whose noise level matches ``sigma`` (pixel units)."""
        ratio = ((1 - self.abar) / self.abar).sqrt()
        return int((ratio - 2 * float(sigma)).abs().argmin())

    def eps(self, inp: torch.Tensor, t: int) -> torch.Tensor:
        """The UNet's noise prediction for ``inp``, a variance-preserving ``x_t`` in the model's
        ``[-1, 1]`` range at step ``t`` (``v_prediction`` and ``sample`` models converted)."""
        steps = torch.full((len(inp),), int(t), device=inp.device, dtype=torch.long)
        out = self._unet(inp.to(self._unet.dtype), steps).sample.float()
        if out.shape[1] == 2 * inp.shape[1]:  # learned variance: mean prediction first
            out = out[:, : inp.shape[1]]
        a = float(self.abar[t])
        if self._pred == "v_prediction":
            return math.sqrt(1 - a) * inp + math.sqrt(a) * out
        if self._pred == "sample":
            return (inp - math.sqrt(a) * out) / math.sqrt(1 - a)
        return out

    def tweedie(self, inp: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps_hat)`` in the model's range for a variance-preserving ``x_t`` at step ``t``
        (``x0_hat`` clipped to ``[-1, 1]`` with ``clip``)."""
        a = float(self.abar[t])
        eps = self.eps(inp, t)
        x0 = (inp - math.sqrt(1 - a) * eps) / math.sqrt(a)
        return (x0.clamp(-1, 1) if self.clip else x0), eps

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
        import torch.nn.functional as F

        self.load(x_t.device)
        h, w = x_t.shape[-2:]
        t = self.timestep(sigma)
        inp = math.sqrt(float(self.abar[t])) * (2 * x_t.float() - 1)
        cfg = self._unet.config
        if self.resize:
            size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
            inp = F.interpolate(inp, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        else:
            factor = 2 ** (len(cfg.down_block_types) - 1)
            if h % factor or w % factor:
                raise HarnessError(f"DiffusersDenoiser: the UNet needs sides divisible by {factor}, got "
                                   f"{h}x{w}; set xai.denoiser.resize=true or use a matching model")
        x0, _ = self.tweedie(inp, t)
        if self.resize:
            x0 = F.interpolate(x0, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            x0 = x0.clamp(-1, 1) if self.clip else x0
        return ((x0 + 1) / 2).to(x_t.dtype)

    def __repr__(self) -> str:
        return f"DiffusersDenoiser(model_path={self.model_path!r}, resize={self.resize}, clip={self.clip})"
