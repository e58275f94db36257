"""Reference implementations the benchmark times our explainers against, at equal settings.

:func:`reference` dispatches on the explainer's class and returns a label and a function
``fn(x, targets)`` that explains a batch the plain way a user of that package would write it
(lime's ``explain_instance``, shap's ``KernelExplainer`` / ``Explainer``, captum's attribution
classes), with our explainer's settings: same segmentation, sample counts, steps, windows,
baselines and batch sizes. A method without a usable reference raises :class:`NoReference`
with the reason, which the benchmark prints as ``n/a (reason)``.

Heavy imports (captum, lime, shap) happen inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import singledispatch
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn

from harness.xai.attention import AttentionRollout, CheferRelevance
from harness.xai.base import fill_like, image_seed
from harness.xai.gradcam import GradCAM
from harness.xai.gradients import ABS_REDUCTIONS, InputXGradient, Saliency, SmoothGrad, reduce_channels
from harness.xai.integrated_gradients import IntegratedGradients
from harness.xai.kernelshap import KernelShap
from harness.xai.lime import Lime
from harness.xai.occlusion import Occlusion
from harness.xai.partition_shap import PartitionShap
from harness.xai.random import RandomExplainer
from harness.xai.superpixels import segment

Reference = tuple[str, Callable[[torch.Tensor, torch.Tensor], Any]]


class NoReference(Exception):
    """No usable reference implementation; the message says why."""


@singledispatch
def reference(explainer: Any, model: nn.Module, x: torch.Tensor) -> Reference:
    """``(label, fn)`` for ``explainer`` on ``model``; ``x`` is a sample input (layer lookup)."""
    if "lrp" in type(explainer).__name__.lower() and "vit" in getattr(explainer, "architectures", ()):
        try:
            import lxt  # noqa: F401
        except Exception as e:  # noqa: BLE001 - lxt 2.1 fails with transformers 5 (its issue #47)
            raise NoReference(f"LXT does not import here: {type(e).__name__}: {str(e)[:120]}") from None
        raise NoReference("LXT supports only torchvision's ViT and patches torch for the whole "
                          "process with no undo; it cannot be timed next to the other methods")
    raise NoReference(f"no reference implementation for {type(explainer).__name__}")


@reference.register
def _(ex: RandomExplainer, model: nn.Module, x: torch.Tensor) -> Reference:
    raise NoReference("control without model work")


@reference.register
def _(ex: AttentionRollout, model: nn.Module, x: torch.Tensor) -> Reference:
    raise NoReference("no packaged implementation (the paper's code is not a library)")


@reference.register
def _(ex: CheferRelevance, model: nn.Module, x: torch.Tensor) -> Reference:
    raise NoReference("no packaged implementation (the paper's code is not a library)")


@reference.register
def _(ex: IntegratedGradients, model: nn.Module, x: torch.Tensor) -> Reference:
    from captum.attr import IntegratedGradients as CaptumIG

    ig = CaptumIG(model, multiply_by_inputs=ex.multiply_by_inputs)

    def fn(x: torch.Tensor, t: torch.Tensor) -> Any:
        base = fill_like(model, x, ex.baseline, "xai.baseline")
        return ig.attribute(x, baselines=base, target=t, n_steps=ex.n_steps, method=ex.method,
                            internal_batch_size=ex.internal_batch_size).sum(1).detach().cpu().numpy()

    return "captum IntegratedGradients", fn


@reference.register
def _(ex: Saliency, model: nn.Module, x: torch.Tensor) -> Reference:
    from captum.attr import Saliency as CaptumSaliency

    if ex.space != "pixel":
        raise NoReference("captum's Saliency takes gradients in pixel space only")
    sal = CaptumSaliency(model)
    take_abs = ex.reduce in ABS_REDUCTIONS

    def fn(x: torch.Tensor, t: torch.Tensor) -> Any:
        g = sal.attribute(x.detach().requires_grad_(True), target=t, abs=take_abs)
        return reduce_channels(g, ex.reduce).detach().cpu().numpy()

    return "captum Saliency", fn


@reference.register
def _(ex: InputXGradient, model: nn.Module, x: torch.Tensor) -> Reference:
    from captum.attr import InputXGradient as CaptumIxG

    ixg = CaptumIxG(model)

    def fn(x: torch.Tensor, t: torch.Tensor) -> Any:
        return ixg.attribute(x.detach().requires_grad_(True), target=t).sum(1).detach().cpu().numpy()

    return "captum InputXGradient (input, not input - baseline)", fn


@reference.register
def _(ex: SmoothGrad, model: nn.Module, x: torch.Tensor) -> Reference:
    from captum.attr import NoiseTunnel
    from captum.attr import Saliency as CaptumSaliency

    if ex.space != "pixel":
        raise NoReference("captum's NoiseTunnel adds noise in pixel space only")
    nt = NoiseTunnel(CaptumSaliency(model))
    take_abs = ex.reduce in ABS_REDUCTIONS

    def fn(x: torch.Tensor, t: torch.Tensor) -> Any:
        stdev = ex.noise_level * float(x.max() - x.min())
        g = nt.attribute(x, nt_type=ex.variant, nt_samples=ex.n_samples, stdevs=stdev, target=t, abs=take_abs,
                         nt_samples_batch_size=max(1, ex.batch_size // len(x)))
        if ex.multiply_by_inputs:
            return (g * x).sum(1).detach().cpu().numpy()
        return reduce_channels(g, ex.reduce).detach().cpu().numpy()

    return "captum NoiseTunnel(Saliency)", fn


@reference.register
def _(ex: GradCAM, model: nn.Module, x: torch.Tensor) -> Reference:
    from captum.attr import LayerAttribution, LayerGradCam

    from harness.xai.base import is_vit

    if is_vit(model):
        raise NoReference("captum LayerGradCam needs a [N, C, H, W] layer; a ViT's tokens need a reshape")
    cam = LayerGradCam(model, ex._module(model, x[:1]))

    def fn(x: torch.Tensor, t: torch.Tensor) -> Any:
        a = cam.attribute(x, target=t, relu_attributions=ex.relu)
        return LayerAttribution.interpolate(a, tuple(x.shape[-2:]), "bilinear")[:, 0].detach().cpu().numpy()

    return "captum LayerGradCam", fn


@reference.register
def _(ex: Occlusion, model: nn.Module, x: torch.Tensor) -> Reference:
    from captum.attr import Occlusion as CaptumOcclusion

    occ = CaptumOcclusion(model)

    def fn(x: torch.Tensor, t: torch.Tensor) -> Any:
        base = fill_like(model, x, ex.baseline, "xai.baseline")
        patch, stride = ex.sizes(*x.shape[-2:])
        a = occ.attribute(x, sliding_window_shapes=(3, patch, patch), strides=(3, stride, stride),
                          baselines=base, target=t, perturbations_per_eval=max(1, ex.batch_size // len(x)))
        return a.sum(1).detach().cpu().numpy()

    return "captum Occlusion", fn


def _classify(model: nn.Module, softmax: bool) -> Callable[[np.ndarray], np.ndarray]:
    """A numpy ``[B, H, W, 3]`` -> ``[B, classes]`` model function, as lime and shap take it."""
    from harness.xai.base import model_device

    dev = model_device(model)

    @torch.no_grad()
    def f(images: np.ndarray) -> np.ndarray:
        out = model(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(dev, torch.float32))
        return (out.softmax(1) if softmax else out).cpu().numpy()

    return f


@reference.register
def _(ex: Lime, model: nn.Module, x: torch.Tensor) -> Reference:
    from lime.lime_image import LimeImageExplainer
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    if ex.segmentation == "slic":
        segmentation_fn = SegmentationAlgorithm("slic", n_segments=ex.n_segments, compactness=10.0, start_label=0)
    elif ex.segmentation == "quickshift":
        segmentation_fn = SegmentationAlgorithm("quickshift", kernel_size=4, max_dist=200, ratio=0.2)
    else:
        segmentation_fn = lambda img: segment(img, "grid", patch=ex.patch)  # noqa: E731
    classify = _classify(model, softmax=ex.output == "softmax")

    def fn(x: torch.Tensor, t: torch.Tensor) -> Any:
        explainer = LimeImageExplainer(kernel_width=ex.kernel_width)
        maps = []
        for img_t, target in zip(x, t.tolist()):
            hide = None
            if ex.hide != "superpixel_mean":
                hide = fill_like(model, img_t[None], ex.hide, "xai.hide")[0, :, 0, 0].cpu().numpy()
            # the same silenced progress bar as ours (lime draws one per image)
            with mock.patch("lime.lime_image.tqdm", lambda it, **_: it):
                exp = explainer.explain_instance(
                    img_t.permute(1, 2, 0).cpu().numpy().astype(np.float64), classify, labels=(target,),
                    top_labels=None, hide_color=hide, num_samples=ex.num_samples, batch_size=ex.batch_size,
                    segmentation_fn=segmentation_fn)
            weights = np.zeros(int(exp.segments.max()) + 1)
            for sp, w in exp.local_exp[target]:
                weights[sp] = w
            maps.append(weights[exp.segments])
        return np.stack(maps)

    return "lime LimeImageExplainer.explain_instance", fn


@reference.register
def _(ex: KernelShap, model: nn.Module, x: torch.Tensor) -> Reference:
    import shap

    def fn(x: torch.Tensor, t: torch.Tensor) -> Any:
        fill = fill_like(model, x, ex.baseline, "xai.baseline")
        maps = []
        for i, target in enumerate(t.tolist()):
            img = x[i].permute(1, 2, 0).cpu().numpy().astype(np.float32)
            segs = segment(img, ex.segmentation, n_segments=ex.n_segments, patch=ex.patch,
                           seed=image_seed(ex.seed, img))
            seg_t = torch.from_numpy(segs).to(x.device)
            m = int(segs.max()) + 1

            @torch.no_grad()
            def f(z: np.ndarray, i: int = i, target: int = target, seg_t: torch.Tensor = seg_t) -> np.ndarray:
                out = []
                for s in range(0, len(z), ex.batch_size):
                    keep = torch.from_numpy(z[s : s + ex.batch_size] > 0.5).to(x.device)[:, seg_t][:, None]
                    out.append(model(torch.where(keep, x[i : i + 1], fill[i : i + 1]))[:, target].cpu())
                return torch.cat(out).double().numpy()

            explainer = shap.KernelExplainer(f, np.zeros((1, m)))
            phi = np.asarray(explainer.shap_values(np.ones((1, m)), nsamples=ex.n_samples, l1_reg=False,
                                                   silent=True)).reshape(-1)
            maps.append(phi[segs])
        return np.stack(maps)

    return "shap KernelExplainer (l1_reg=False)", fn


@reference.register
def _(ex: PartitionShap, model: nn.Module, x: torch.Tensor) -> Reference:
    import shap

    classify = _classify(model, softmax=False)

    def fn(x: torch.Tensor, t: torch.Tensor) -> Any:
        imgs = x.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
        if isinstance(ex.masker, str) and not ex.masker.endswith("mean"):
            mask_value: Any = ex.masker
        else:  # one masker for the batch, as in shap's examples (``mean``: the first image's)
            mask_value = fill_like(model, x[:1], ex.masker, "xai.masker")[0].permute(1, 2, 0).cpu().numpy()
        explainer = shap.Explainer(classify, shap.maskers.Image(mask_value, imgs[0].shape))
        maps = []
        for img, target in zip(imgs, t.tolist()):
            sv = explainer(img[None], max_evals=ex.max_evals, batch_size=ex.batch_size, outputs=[target],
                           silent=True)
            maps.append(np.asarray(sv.values[0, ..., 0]).sum(-1))
        return np.stack(maps)

    return "shap Explainer(Image masker) = Partition", fn
