"""``python -m harness.counterfactual``: counterfactual explanations, scored and logged to MLflow.

For the first ``n_images`` images, each generator of ``generators`` (see
:mod:`harness.xai.counterfactual`) makes a counterfactual towards ``target``; the run logs per
generator the mean validity, validity after denoising, proximity and realism with their standard
errors (``<generator>_<score>``, ``_sem``), the real images' realism for reference, a figure
(input, each counterfactual, its change), the images (``counterfactuals.npz``), a per-image
table, and, with an ``mllm``, its description of each change (``answers.jsonl``).
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from harness import CONF_DIR
from harness.types import HarnessError, exit_cleanly

log = logging.getLogger(__name__)


def figure(x, outputs: dict, names: list[str], labels: list[str], path: Path, n: int) -> None:
    """Rows: images; columns: the input, then per generator its counterfactual and the change
    (signed, channel mean, one colour scale for the figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(x))
    gens = list(outputs)
    cols = 1 + 2 * len(gens)
    fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.35 * n + 0.4), squeeze=False)
    diffs = {g: (outputs[g][:n] - x[:n]).mean(1) for g in gens}
    vmax = max(float(np.abs(d).max()) for d in diffs.values()) or 1.0
    for i in range(n):
        axes[i, 0].imshow(x[i].transpose(1, 2, 0))
        axes[i, 0].set_ylabel(labels[i], fontsize=6)
        for k, g in enumerate(gens):
            axes[i, 1 + 2 * k].imshow(outputs[g][i].transpose(1, 2, 0))
            axes[i, 1 + 2 * k].set_xlabel(names[g][i], fontsize=6)
            im = axes[i, 2 + 2 * k].imshow(diffs[g][i], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    for k, title in enumerate(["input"] + [t for g in gens for t in (g, f"{g} - input")]):
        axes[0, k].set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.5, label="change (pixel units)")
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def run(cfg: DictConfig) -> dict[str, float]:
    import torch

    from harness.components import build
    from harness.evaluation.stage import aggregate
    from harness.models.stage import model_inputs
    from harness.utils import seeded
    from harness.xai.counterfactual import reconstruction_error, resolve_targets, scores
    from harness.xai.freemcg import check_denoiser_data

    tracker = build(cfg.tracking)  # a bad store fails before anything is trained
    prompt = None if cfg.get("mllm") is None else build(cfg.prompt)
    mllm = None if cfg.get("mllm") is None else build(cfg.mllm)
    denoiser = build(cfg.denoiser)
    if not hasattr(denoiser, "tweedie"):
        raise HarnessError("denoiser: counterfactuals need a diffusion model (ddpm_shapes, ddpm_cifar10 or "
                           f"diffusers), not {type(denoiser).__name__}")
    generators = {}
    for name, node in (cfg.generators or {}).items():
        from hydra.utils import get_class

        cls = get_class(str(node._target_))
        generators[name] = build(node, **({"denoiser": denoiser} if "denoiser" in inspect.signature(cls).parameters
                                          else {}))
    if not generators:
        raise HarnessError("generators is empty: name at least one (freemcg, gradient)")
    data = build(cfg.dataset)
    check_denoiser_data(denoiser, data.class_names, "xai/denoiser@denoiser")
    model = build(cfg.model)
    x = model_inputs(model, data).x
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])
    targets = resolve_targets(cfg.target, logits, list(data.class_names))
    keep = np.flatnonzero((logits.argmax(1) != targets).numpy() if cfg.skip_target else np.ones(len(x), bool))
    keep = keep[: int(cfg.n_images)]
    if not len(keep):
        raise HarnessError(f"no image is left to change: every image is predicted as target={cfg.target!r}")
    x, targets, preds = x[keep], targets[keep], logits.argmax(1)[keep]
    names = list(data.class_names)
    ids = [data.ids[i] for i in keep]
    outputs, per_image, seconds = {}, {}, {}
    for name, gen in generators.items():
        log.info("counterfactuals: %s on %d images towards %s", gen, len(x), cfg.target)
        t0 = time.process_time()
        with seeded(int(cfg.seed)):
            outputs[name] = gen(model, x, targets)
        seconds[name] = time.process_time() - t0
        for k, v in scores(model, denoiser, x, outputs[name], targets, float(cfg.realism_sigma), int(cfg.seed)).items():
            per_image[f"{name}_{k}"] = v
    per_image["input_realism_error"] = reconstruction_error(denoiser, x, float(cfg.realism_sigma), int(cfg.seed))
    summary = {k: v for k, v in aggregate(per_image).items() if not k.endswith(("_ci95_low", "_ci95_high"))}
    records = []
    with tracker.start_run(str(cfg.run_name), tags={"kind": "counterfactual", "target": str(cfg.target)}) as rec:
        rec.params({"target": cfg.target, "n_images": len(x), "realism_sigma": cfg.realism_sigma, "seed": cfg.seed,
                    **{f"{g}": repr(v) for g, v in generators.items()}, "denoiser": repr(denoiser)})
        rec.text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        rec.metrics(summary)
        rec.tags({f"summary.seconds_{g}_per_image": repr(s / len(x)) for g, s in seconds.items()}
                 | {f"summary.denoiser_{k}": repr(v) for k, v in denoiser.info.items()})
        xs = x.numpy()
        outs = {g: o.numpy() for g, o in outputs.items()}
        with torch.no_grad():
            now = {g: model(o).argmax(1).tolist() for g, o in outputs.items()}
        shown = {g: [f"-> {names[p]}" for p in now[g]] for g in outputs}
        labels = [f"{names[int(p)]} -> {names[int(t)]}?" for p, t in zip(preds, targets)]
        with rec.folder() as out:
            figure(xs, outs, shown, labels, out / "counterfactuals.png", int(cfg.n_figure))
            np.savez_compressed(out / "counterfactuals.npz", inputs=xs, targets=targets.numpy(), ids=np.array(ids),
                                **{g: o for g, o in outs.items()})
        import pandas as pd

        table = pd.DataFrame({"image_id": ids, "predicted": [names[int(p)] for p in preds],
                              "target": [names[int(t)] for t in targets], **per_image})
        if mllm is not None:
            records = describe(cfg, mllm, prompt, xs, outs, preds, targets, names, ids)
            rec.text("\n".join(json.dumps(r, default=str) for r in records) + "\n", "answers.jsonl")
        rec.table(table, "counterfactuals.json")
    for g in generators:
        print(f"{g}: validity {summary[f'{g}_validity']:.3f} (after denoising {summary[f'{g}_validity_denoised']:.3f}), "
              f"proximity L1 {summary[f'{g}_proximity_l1']:.4f}, realism error {summary[f'{g}_realism_error']:.5f} "
              f"(real images {summary['input_realism_error']:.5f}), {seconds[g] / len(x):.1f} CPU-s per image")
    return summary


def describe(cfg, mllm, prompt, xs, outs, preds, targets, names, ids) -> list[dict]:
    """Ask the MLLM what changed, one request per image and generator (input | counterfactual)."""
    from dataclasses import asdict

    from harness.mllm.base import Request
    from harness.mllm.stage import AnswerCache, ask
    from harness.render.views import _to_pil

    requests, rid = [], []
    for g, o in outs.items():
        for i in range(len(xs)):
            gap = np.ones((xs.shape[2], 2, 3))
            pair = np.concatenate([xs[i].transpose(1, 2, 0), gap, o[i].transpose(1, 2, 0)], axis=1)
            system, user = prompt.render(label=names[int(preds[i])], target=names[int(targets[i])],
                                         true_label="", score="", method=g, classifier="")
            requests.append(Request([_to_pil(pair, int(cfg.language.size))], user, system,
                                    label=names[int(preds[i])]))
            rid.append(f"{g}/{ids[i]}")
    records = ask(mllm, requests, rid, AnswerCache(cfg.language.cache_dir), [[] for _ in requests])
    return [asdict(r) for r in records]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="counterfactual")
def main(cfg: DictConfig) -> None:
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    exit_cleanly("harness.counterfactual", run, cfg)


if __name__ == "__main__":
    from harness.validate import open_keys

    sys.argv[1:] = open_keys(sys.argv[1:])
    main()
