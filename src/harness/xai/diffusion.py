"""A diffusion denoiser the harness trains for the data it explains (FreeMCG's manifold).

FreeMCG (Kim et al. 2025) projects its particles onto the data manifold with a diffusion model's
Tweedie denoiser. No pretrained diffusion weights can be downloaded here, so, as it does for the
shapes classifier, the harness trains one: a ``diffusers`` ``UNet2DModel`` with the DDPM
objective (Ho et al. 2020: predict the noise ``eps`` of ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t)
eps``, mean squared error, ``t`` uniform), on the images of any harness dataset config
(``train_data``), cached under ``cache_dir/denoisers/<name>-<hash>/`` in the ``diffusers`` layout
(``unet/``, ``scheduler/``), so that :class:`~harness.xai.freemcg.DiffusersDenoiser` loads it like
any local diffusers checkpoint. The hash covers every setting and the training images' bytes
(not their path), so the same data found elsewhere on disk hits the same cache. Parallel jobs of
a sweep wait for the first trainer (a file lock).

Deviations from a full DDPM, for training on two CPU cores in minutes (each a setting):
    * ``max_sigma``: only the diffusion steps whose noise level (pixel units of ``[0, 1]``
      images) is at most ``max_sigma`` are trained. FreeMCG's attribution uses one noise level
      (``xai.sigma``, 0.15) and its counterfactuals start from a partly noised image
      (``sigma_start``, 0.4), so the pure-noise end of the schedule, which only unconditional
      sampling needs, is never used.
    * the UNet is small (about 0.27 M parameters, no attention): it denoises 32-pixel images.
Weights trained with the shipped configs ship with the package (``harness/models/weights/``);
``shipped=false`` trains them here.

The denoising error on held-out images is measured after training (``info``): the mean squared
error of the Tweedie estimate at ``eval_sigma`` against that of the noisy input (``sigma^2``) and of
the offline Wiener prior (:class:`~harness.xai.freemcg.WienerDenoiser`); the run logs it as
``summary.denoiser_*``.

References:
    Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020.
    Kim et al., "Derivative-Free Diffusion Manifold-Constrained Gradient for Unified XAI", CVPR 2025.
    von Platen et al., "Diffusers: State-of-the-art diffusion models", GitHub 2022.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from harness.types import HarnessError, ImageSet
from harness.utils import config_hash, seeded, to_plain, trainer_lock
from harness.xai.freemcg import DiffusersDenoiser, WienerDenoiser

log = logging.getLogger(__name__)

TRAINING_VERSION = 1  # bump when the training procedure changes in a way the settings do not show
UNET = MappingProxyType({"block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
                         "down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3})


def _shipped() -> Path:
    from harness.models.shapes_vit import SHIPPED

    return SHIPPED


def images_tensor(data: ImageSet) -> torch.Tensor:
    """``[N, 3, H, W]`` float images in ``[0, 1]``; all images must have one size."""
    sizes = {im.shape for im in data.images}
    if len(sizes) != 1:
        raise HarnessError(f"xai.denoiser.train_data: the denoiser trains on images of one size; got {sorted(sizes)[:3]}")
    return torch.from_numpy(np.stack(data.images)).permute(0, 3, 1, 2).float() / 255.0


def _build(hw: tuple[int, int], unet: dict[str, Any]):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=list(hw), in_channels=3, out_channels=3, **unet)


def _scheduler(num_train_timesteps: int, beta_schedule: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type="epsilon", clip_sample=True)


def max_timestep(abar: torch.Tensor, sigma: float) -> int:
    """The last diffusion step whose noise level, in pixel units, is at most ``sigma``."""
    ratio = ((1 - abar) / abar).sqrt() / 2  # noise-to-signal ratio of [-1, 1] data, in [0, 1] pixel units
    return max(int((ratio <= sigma).sum()) - 1, 0)


def _train(unet, sched, x: torch.Tensor, cfg: dict[str, Any], device: str) -> dict[str, float]:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    abar = sched.alphas_cumprod.to(torch.float32)
    t_hi = max_timestep(abar.double(), cfg["max_sigma"]) + 1
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=0.0)
    lr_at = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["steps"], pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg["seed"])
    data = 2 * x - 1  # the model's [-1, 1] range
    unet.train().to(device)
    bar = tqdm(total=cfg["steps"], desc="training the DDPM denoiser", disable=None)
    ema, every = None, max(1, cfg["steps"] // 10)
    for step in range(cfg["steps"]):
        idx = torch.randint(len(data), (cfg["batch_size"],), generator=gen)
        x0 = data[idx]
        if cfg["flip"]:
            flip = torch.rand(len(x0), generator=gen) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
        t = torch.randint(t_hi, (len(x0),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.nn.functional.mse_loss(unet(xt.to(device), t.to(device)).sample, eps.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_at.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}")
        if (step + 1) % every == 0:  # a line per tenth reaches the job's log, terminal or not
            el = time.perf_counter() - t0
            log.info("denoiser step %d/%d: loss %.4f, %.0f s, about %.0f s left", step + 1, cfg["steps"], ema, el,
                     el / (step + 1) * (cfg["steps"] - step - 1))
    bar.close()
    unet.eval()
    return {"train_seconds": time.perf_counter() - t0, "train_loss": float(ema), "max_timestep": float(t_hi - 1)}


def _data_digest(x: torch.Tensor) -> str:
    return hashlib.sha256((x * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()[:12]


def _instantiate(data_cfg: dict[str, Any] | ImageSet, what: str) -> ImageSet:
    if isinstance(data_cfg, ImageSet):
        return data_cfg
    from hydra.utils import instantiate

    data = instantiate(to_plain(data_cfg))
    if not isinstance(data, ImageSet) or not len(data):
        raise HarnessError(f"xai.denoiser.{what} gave no images: a dataset config (its _target_ returns a "
                           "harness ImageSet), e.g. the shapes generator's or an npz file's")
    return data


def ddpm_denoiser(
    cache_dir: str,
    train_data: dict[str, Any],
    val_data: dict[str, Any],
    name: str = "ddpm",
    unet: Mapping[str, Any] = UNET,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    max_sigma: float = 1.05,
    steps: int = 2500,
    batch_size: int = 64,
    lr: float = 2e-3,
    flip: bool = True,
    seed: int = 0,
    eval_sigma: float = 0.15,
    shipped: bool = True,
    device: str = "cpu",
    resize: bool = False,
    clip: bool = True,
    dtype: str = "float32",
) -> DiffusersDenoiser:
    """The DDPM denoiser trained with these settings, from the cache (training it on first use).

    Args:
        cache_dir: root of the harness cache; the weights land in ``denoisers/<name>-<hash>/``.
        train_data: the training images: a dataset config (``_target_`` returning an ImageSet).
        val_data: held-out images (never trained on) for the reported denoising error.
        name: the cache folder's prefix.
        unet: ``UNet2DModel`` arguments (sizes and blocks); ``sample_size`` and channels are set
            from the data.
        num_train_timesteps, beta_schedule: the DDPM noise schedule (``DDPMScheduler``).
        max_sigma: train only the steps whose pixel-unit noise level is at most this (see the
            module docstring); FreeMCG's ``sigma`` and ``sigma_start`` must not exceed it.
        steps, batch_size, lr: AdamW with a one-cycle schedule; batches drawn with replacement.
        flip: random horizontal flips of the training images.
        seed: seeds initialisation, batches and noise.
        eval_sigma: the noise level of the reported denoising error.
        shipped: use the weights shipped with the package when they are of exactly this config.
        device: where training runs and the denoiser lives.
        resize, clip, dtype: passed to :class:`~harness.xai.freemcg.DiffusersDenoiser`.
    """
    if not 0 < float(max_sigma) <= 5:
        raise HarnessError(f"xai.denoiser.max_sigma={max_sigma!r} is not valid: a noise level in (0, 5] pixel units")
    if int(steps) < 1 or int(batch_size) < 1:
        raise HarnessError(f"xai.denoiser.steps={steps!r}, batch_size={batch_size!r}: both must be positive")
    train = _instantiate(train_data, "train_data")
    x = images_tensor(train)
    cfg = to_plain(dict(unet=dict(unet), num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                        max_sigma=float(max_sigma), steps=int(steps), batch_size=int(batch_size), lr=float(lr),
                        flip=bool(flip), seed=int(seed), data=_data_digest(x), size=list(x.shape[-2:]),
                        version=TRAINING_VERSION))
    folder = Path(cache_dir) / "denoisers" / f"{name}-{config_hash(cfg)}"
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "meta.json"
    with trainer_lock(folder, "denoiser"):
        source = _shipped() / folder.name
        if shipped and not meta_path.exists() and (source / "meta.json").is_file():
            for sub in ("unet", "scheduler"):
                shutil.copytree(source / sub, folder / sub, dirs_exist_ok=True)
            shutil.copyfile(source / "meta.json", folder / ".meta.tmp")
            os.replace(folder / ".meta.tmp", meta_path)  # last: its presence means complete
            log.info("using the shipped denoiser of this config (%s; shipped=false trains it here)", source.name)
        if not meta_path.exists():
            log.info("training the %s denoiser (first use of this config, %d images) into %s", name, len(x), folder)
            with seeded(seed):
                net = _build(tuple(x.shape[-2:]), cfg["unet"])
                sched = _scheduler(num_train_timesteps, beta_schedule)
                meta = _train(net, sched, x, cfg, device)
            net.to("cpu").save_pretrained(str(folder / "unet"))
            sched.save_pretrained(str(folder / "scheduler"))
            val = images_tensor(_instantiate(val_data, "val_data"))
            learned = DiffusersDenoiser(str(folder), resize=resize, clip=clip, dtype=dtype)
            from harness.xai.counterfactual import reconstruction_error

            def denoising_error(den) -> float:  # mean squared error of the Tweedie estimate, pixel units
                return float(reconstruction_error(den, val, eval_sigma, seed).mean())

            meta |= {"class_names": list(train.class_names), "n_train_images": float(len(x)), "n_val_images": float(len(val)), "eval_sigma": float(eval_sigma),
                     "val_mse": denoising_error(learned),
                     "val_mse_noisy": denoising_error(lambda z, s: z),
                     "val_mse_wiener": denoising_error(WienerDenoiser())}
            log.info("denoiser trained in %.0f s: held-out MSE at sigma %.2f %.5f (noisy input %.5f, Wiener prior %.5f)",
                     meta["train_seconds"], eval_sigma, meta["val_mse"], meta["val_mse_noisy"], meta["val_mse_wiener"])
            (folder / ".meta.tmp").write_text(json.dumps({**meta, "config": cfg}, indent=2))
            os.replace(folder / ".meta.tmp", meta_path)
    return DiffusersDenoiser(str(folder), resize=resize, clip=clip, dtype=dtype)
