"""Cross-check of the harness's FreeMCG gradient estimate against pnpxai's ``Gfgp`` (its FreeMCG).

What it compares: on the default shapes ViT and ``--n`` shapes test images (default 16), the
ensemble gradient estimate ``[3, 32, 32]`` of ``harness.xai.freemcg.FreeMCG.estimate_gradient``
(diffusers denoiser ``--denoiser``) with ``pnpxai.explainers.gfgp.Gfgp.attribute`` (pnpxai 0.1.4)
at equal settings: the same UNet, the same diffusion step ``t`` (default 300; the harness's
``sigma = sqrt((1 - abar_t) / abar_t) / 2`` is computed from the scheduler so that it picks that
step exactly), the same number of particles ``J`` and the *same noise draws* (pnpxai's diffusion
adapter reads the ``eps`` that ``FreeMCG._noise`` draws for the image, so the particles agree to
float rounding). Two known differences remain:

* pnpxai's weights use the softmax at the clean input, ``<f_j - f_bar, e_c - softmax(f(x))>``; the
  harness uses each particle's softmax, ``e_c - softmax(f_j)`` (the gradient of ``log p_c`` at
  ``x_j``);
* scale: pnpxai sums over particles in ``[-1, 1]`` pixel units with no normalisation, the harness
  divides by ``(J - 1) sigma^2`` in ``[0, 1]`` units, so the expected norm ratio pnpxai / harness
  is ``2 (J - 1) sigma^2``.

The script prints, per image, the Pearson correlation of the two estimates (all 3x32x32 values,
and the channel-summed 32x32 maps) and their norm ratio, then the same against a harness variant
recomputed here from the very particles and logits of the harness call, with the clean-input
softmax: that one should correlate ~1 with pnpxai (and its norm ratio equal
``2 (J - 1) sigma^2``), showing the remaining difference is exactly the softmax choice. Both
explainers are timed in CPU seconds (``time.process_time``, one torch thread).

pnpxai is used through a subclass that overrides only ``tweedie_perturb``: the stock one
min-max rescales the input in place (it goes through numpy sharing the tensor's memory), resizes
to 256 px for the diffusion model and 224 px for the particles, and round-trips through uint8 PIL
images; ours keeps 32x32 float particles and feeds the classifier ``(x0t + 1) / 2`` as the
harness does. ``attribute`` and ``get_gfgp`` (the formula) are pnpxai's own. Its constructor
downloads a guided-diffusion model, so the object is built with ``Gfgp.__new__`` and the diffusion
is an adapter over the diffusers UNet with guided-diffusion's ``tweedie_simple(model, x0, t) ->
(x0t, xt)`` interface (Tweedie estimate clipped to ``[-1, 1]``, as the harness clips).

How to run (from the repository root; ``--with`` builds an overlay environment in uv's cache and
leaves pyproject.toml / uv.lock alone):

    uv run --with pnpxai==0.1.4 python experiments/benchmarks/freemcg_pnpxai.py \
        --denoiser PATH [--n 16] [--particles 100] [--t 300]

``PATH`` is a diffusers folder with ``unet/`` and ``scheduler/`` (what
``harness.xai.freemcg.DiffusersDenoiser`` loads, e.g. the one ``conf/xai/denoiser/ddpm_shapes``
trains). The overlay resolves pnpxai's requirements on its own: it installs its own copy of torch
(the same version as the project's at the time of writing) and optuna 5 over the project's
optuna 2, harmless here.

Why this is not a CI test: it needs pnpxai, a third-party package that is not a dependency of the
harness (and pulls a second torch into the overlay), and a trained diffusion model on disk; it runs
``n * J`` UNet passes one particle at a time (pnpxai's loop), minutes on a CPU. The harness's own
properties of the estimator (convergence, manifold constraint, determinism) are tested in
tests/test_freemcg.py without either.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


class SharedNoiseTweedie:
    """guided-diffusion's ``tweedie_simple`` interface over a diffusers epsilon-prediction UNet,
    drawing the noise from a given ``[J, C, H, W]`` tensor (one row per call) instead of ``randn``."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self._eps, self._k = None, 0

    def use(self, eps: torch.Tensor) -> None:
        self._eps, self._k = eps, 0

    @torch.no_grad()
    def tweedie_simple(self, model, x0: torch.Tensor, t: int):
        a = float(self.alphas_cumprod[t])
        eps = self._eps[self._k : self._k + len(x0)].to(x0)
        self._k += len(x0)
        xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        eps_hat = model(xt, torch.full((len(xt),), t, dtype=torch.long, device=xt.device))
        x0t = ((xt - math.sqrt(1 - a) * eps_hat) / math.sqrt(a)).clamp(-1, 1)
        return x0t, xt


def make_gfgp(classifier, unet, alphas_cumprod, t: int, n_particles: int, noise):
    """pnpxai's Gfgp without its download, at the input resolution, with the harness's noise."""
    from pnpxai.explainers.base import Explainer
    from pnpxai.explainers.gfgp import Gfgp

    class Gfgp32(Gfgp):
        def tweedie_perturb(self, x, idx: int = 300, n_perturbations: int = 100):
            """As pnpxai's, one particle per call, minus the min-max rescale (in place), the
            256/224 px resizes and the uint8 round trip; ``x`` is one ``[3, H, W]`` image in [0, 1]."""
            self.diffusion.use(noise(x))  # the eps FreeMCG draws for this image (seeded by its bytes)
            x0 = x.detach().unsqueeze(0) * 2 - 1
            x0ts, fx0ts = [], []
            with torch.no_grad():
                for _ in range(n_perturbations):
                    x0t, _ = self.diffusion.tweedie_simple(model=self.diffusion_model, x0=x0, t=idx)
                    pred = self.model((x0t + 1) / 2)
                    x0ts.append(x0t.squeeze(0).cpu().numpy())
                    fx0ts.append(pred.squeeze(0).cpu().numpy())
            return np.array(x0ts), np.array(fx0ts)

    g = Gfgp32.__new__(Gfgp32)
    Explainer.__init__(g, classifier)
    g.transforms = None
    g.diffusion_model = lambda xt, steps: unet(xt, steps).sample[:, : xt.shape[1]]
    g.diffusion = SharedNoiseTweedie(alphas_cumprod)
    g.timesteps = [t]
    g.n_perturbations = n_particles
    return g


class Recorder:
    """The classifier, keeping every batch it sees and returns (the harness's particles and logits)."""

    def __init__(self, model) -> None:
        self.model, self.inputs, self.outputs = model, [], []

    def __call__(self, x):
        out = self.model(x)
        self.inputs.append(x)
        self.outputs.append(out)
        return out


def weights(f: torch.Tensor, p: torch.Tensor, target: int) -> torch.Tensor:
    """``<f_j - f_bar, e_c - p_j>`` for logits ``f`` ``[J, K]`` and softmax rows ``p`` (``[J, K]`` or ``[K]``)."""
    v = -p.expand_as(f).clone()
    v[:, target] += 1
    return ((f - f.mean(0)) * v).sum(1)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


def compare(name: str, ref: torch.Tensor, other: torch.Tensor) -> None:
    """Per-image correlations (full and channel-summed) and norm ratio ``|other| / |ref|``."""
    c = [corr(a, b) for a, b in zip(ref, other)]
    cs = [corr(a.sum(0), b.sum(0)) for a, b in zip(ref, other)]
    r = [float(b.norm() / a.norm()) for a, b in zip(ref, other)]
    print(f"\n{name}")
    print("  img   corr(3x32x32)  corr(channel sum)  norm ratio pnpxai/harness")
    for i, (a, b, q) in enumerate(zip(c, cs, r)):
        print(f"  {i:3d}   {a:13.6f}  {b:17.6f}  {q:12.6g}")
    print(f"  median {np.median(c):12.6f}  {np.median(cs):17.6f}  {np.median(r):12.6g}")
    print(f"  min    {np.min(c):12.6f}  {np.min(cs):17.6f}  {np.min(r):12.6g}   (max ratio {np.max(r):.6g})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--denoiser", required=True, help="diffusers folder with unet/ and scheduler/")
    ap.add_argument("--n", type=int, default=16, help="shapes test images")
    ap.add_argument("--particles", type=int, default=100, help="particles J per image")
    ap.add_argument("--t", type=int, default=300, help="diffusion step (sets the harness's sigma)")
    ap.add_argument("--seed", type=int, default=0, help="FreeMCG noise seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import pnpxai
    from diffusers import DDPMScheduler, UNet2DModel
    from hydra.utils import instantiate

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_cfg

    from harness.xai.freemcg import DiffusersDenoiser, FreeMCG

    cfg = make_cfg([f"dataset.n={args.n}"])
    model = instantiate(cfg.model)
    data = instantiate(cfg.dataset)
    x, _ = model.preprocess(data.images)
    targets = torch.as_tensor(data.labels)

    path = Path(args.denoiser).expanduser()
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    sched_dir = path / "scheduler" if (path / "scheduler").is_dir() else path
    sched = DDPMScheduler.from_pretrained(str(sched_dir), local_files_only=True)
    if sched.config.prediction_type != "epsilon":
        raise SystemExit(f"the adapter supports epsilon-prediction UNets, not {sched.config.prediction_type!r}")
    abar = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64)
    a = float(abar[args.t])
    sigma = math.sqrt((1 - a) / a) / 2
    unet = UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True).eval().requires_grad_(False)

    den = DiffusersDenoiser(str(path))
    fm = FreeMCG(n_particles=args.particles, sigma=sigma, denoiser=den, seed=args.seed)
    gfgp = make_gfgp(model, unet, abar, args.t, args.particles, fm._noise)
    J = args.particles
    print(f"pnpxai {pnpxai.__version__ if hasattr(pnpxai, '__version__') else '0.1.4'}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}")
    print(f"images {len(x)}  particles {J}  t {args.t}  sigma {sigma:.6f} (pixel units)  denoiser {path}")

    # harness: the library call, recording its particles and logits
    rec = Recorder(model)
    t0 = time.process_time()
    g_h = fm.estimate_gradient(rec, x, targets)
    cpu_h = time.process_time() - t0
    if den.timestep(sigma) != args.t:
        raise SystemExit(f"the harness picked step {den.timestep(sigma)}, not {args.t}")

    # pnpxai (a clone: the stock code mutates its input)
    t0 = time.process_time()
    with torch.no_grad():
        g_p = gfgp.attribute(x.clone(), targets.clone())
    cpu_p = time.process_time() - t0

    # the harness estimate recomputed from its own particles, per-particle vs clean-input softmax
    parts = torch.cat(rec.inputs).double().reshape(len(x), J, -1)
    logits = torch.cat(rec.outputs).double().reshape(len(x), J, -1)
    with torch.no_grad():
        clean = model(x).double()
    g_pp, g_clean = [], []
    for i in range(len(x)):
        dx = parts[i] - parts[i].mean(0)
        c = int(targets[i])
        for out, p in ((g_pp, logits[i].softmax(-1)), (g_clean, clean[i].softmax(-1))):
            out.append((weights(logits[i], p, c) @ dx / ((J - 1) * sigma**2)).reshape(x.shape[1:]))
    g_pp, g_clean = torch.stack(g_pp), torch.stack(g_clean)
    rel = float((g_pp - g_h.double()).norm() / g_h.double().norm())
    print(f"recomputed per-particle estimate vs FreeMCG.estimate_gradient: relative difference {rel:.2e}")

    g_h, g_p = g_h.double(), g_p.double()
    compare("harness FreeMCG (per-particle softmax) vs pnpxai Gfgp (clean-input softmax)", g_h, g_p)
    compare("harness particles with the clean-input softmax vs pnpxai Gfgp", g_clean, g_p)
    print(f"  expected norm ratio 2 (J - 1) sigma^2 = {2 * (J - 1) * sigma**2:.6g}")
    print(f"\nCPU seconds: harness {cpu_h:.2f}  pnpxai {cpu_p:.2f}  ratio pnpxai/harness {cpu_p / cpu_h:.2f}")


if __name__ == "__main__":
    main()
