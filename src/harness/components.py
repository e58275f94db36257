"""The components of a job, built once from its config: what every entry point uses.

``python -m harness`` (the job), ``harness.report``, ``harness.sensitivity`` and the benchmarks
build their datasets, models, explainers and metrics through :func:`build` and check a method
against a model with :func:`check_capabilities`; :func:`build_components` builds all of a job's
components in the order that stops a bad setting before any expensive work (the cheap parts
first, then data and model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.types import HarnessError, ImageSet


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` (``kwargs`` as its overrides), but a :class:`HarnessError`
    raised by the component comes out as itself (Hydra wraps it), so the user sees its message
    alone."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, HarnessError):
            raise e.__cause__ from None
        raise


def check_capabilities(explainer: Any, model: Any) -> None:
    """Refuse a method the model cannot serve before any work is done."""
    from harness.xai.base import is_vit, methods_for

    name = type(explainer).__name__
    if explainer.needs_gradients and not any(p.requires_grad for p in model.parameters()):
        raise HarnessError(f"{name} needs gradients, but the model has none "
                           "(int8 or TorchScript model?); choose a gradient-free xai option")
    arch = "vit" if is_vit(model) else "cnn"
    net = getattr(model, "net", model)
    kind = f"{type(getattr(net, 'model', net)).__name__}, " + ("a timm ViT" if arch == "vit" else "not a timm ViT")
    if arch not in explainer.architectures:
        raise HarnessError(f"{name} does not serve this model ({kind}); xai options that do: "
                           f"{', '.join(methods_for(arch))}")
    if (reason := explainer.unsupported(model)) is not None:
        raise HarnessError(f"{name} does not serve this model ({kind}): {reason}")


@dataclass
class Language:
    """The language stage's components: renderer, prompt, MLLM and text metrics."""

    renderer: Any
    prompt: Any
    mllm: Any
    text_metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Components:
    """Everything a job runs, built from its config."""

    explainer: Any
    metrics: dict[str, Any]
    language: Language | None
    data: ImageSet
    model: Any
    reveal: Any = None


#: the prompt placeholders a job fills (the language stage's render call)
PIPELINE_FIELDS = {"label", "true_label", "score", "method", "classifier", "audience"}


def build_components(cfg: Any) -> Components:
    """Build a job's components. The explainer, metrics, prompt and MLLM come first, so a bad
    setting stops the job before data load and model training; then data and model, and the
    explainer is checked against the model."""
    explainer = build(cfg.xai)
    metrics = {name: build(m) for name, m in (cfg.get("metrics") or {}).items()}
    language = None if cfg.get("mllm") is None else Language(
        build(cfg.render), build(cfg.prompt), build(cfg.mllm),
        {name: build(m) for name, m in (cfg.get("text_metrics") or {}).items()})
    if language is not None and (extra := language.prompt.fields() - PIPELINE_FIELDS):
        raise HarnessError(f"the prompt uses {', '.join('{' + f + '}' for f in sorted(extra))}, which a job does not "
                           "fill (a prompt for python -m harness.counterfactual, e.g. prompt=counterfactual)")
    if language is not None and getattr(language.renderer, "needs_concepts", False) and not hasattr(explainer, "concepts"):
        raise HarnessError(f"render=concepts draws an image's concepts, which {type(explainer).__name__} does not "
                           "give: use it with xai=crp")
    reveal = None if cfg.get("reveal") is None else build(cfg.reveal)
    if reveal is not None and "concepts" in reveal.spaces and not hasattr(explainer, "concepts"):
        raise HarnessError(f"reveal.space=concepts clusters the concept relevances of xai=crp, which "
                           f"{type(explainer).__name__} does not give: use xai=crp, or reveal.space=maps")
    if language is not None and cfg.get("privacy") is not None and cfg.privacy.enabled:
        from harness.mllm.stage import check_privacy

        check_privacy(language, list(cfg.privacy.allow_hosts))  # before any image is loaded
    data: ImageSet = build(cfg.dataset)
    if len(data) == 0:
        raise HarnessError("the dataset yielded no images" +
                           (f" ({len(data.skipped)} skipped as unreadable)" if data.skipped else ""))
    if getattr(explainer, "denoiser", None) is not None:  # FreeMCG's manifold must be the data's
        from harness.xai.freemcg import check_denoiser_data

        check_denoiser_data(explainer.denoiser, data.class_names)
    model = build(cfg.model)
    if cfg.get("revise") is not None:  # reveal and revise: the corrected model (harness.revise)
        model = build(cfg.revise)(model)
    check_capabilities(explainer, model)
    return Components(explainer, metrics, language, data, model, reveal)
