"""``python -m harness.check model=... dataset=...``: what to run first with a new model and data.

Takes the same command line as a job (``python -m harness``; ``dataset.n`` sets how many images)
and, without tracking or writing anything, prints: the model and the preprocessing it resolved (each setting with where it came from), the
data (images, sizes, skipped files, class names against the model's outputs), the accuracy on
``check.n`` images, forward images per second, and which XAI options can serve the model (the
others with the reason). Warnings name the setting to change; the exit status is 1 when the
model and data do not fit together (more classes in the labels than the model has outputs).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from harness import CONF_DIR
from harness.types import HarnessError, exit_cleanly


def _sizes(images: list[Any]) -> str:
    counts = Counter(f"{im.shape[1]}x{im.shape[0]}" for im in images)
    top = ", ".join(f"{size} ({n})" for size, n in counts.most_common(3))
    return top + (f", {len(counts) - 3} other sizes" if len(counts) > 3 else "")


def _xai(cfg: DictConfig, model: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """The xai options that serve ``model`` and those that refuse it (with the reason)."""
    from harness.benchmark.core import compose_methods
    from harness.components import build, check_capabilities

    with open_dict(cfg):
        cfg.methods, cfg.xai_overrides = None, None
    served, refused = [], []
    aliases = {p.stem for p in (CONF_DIR / "xai").glob("*.yaml") if "_target_" not in OmegaConf.load(p)}
    for name, node in compose_methods(cfg).items():
        if name in aliases:
            continue
        try:
            check_capabilities(build(node), model)
            served.append(name)
        except HarnessError as e:
            refused.append((name, str(e).split(": ", 1)[-1] if "): " in str(e) else str(e).split("; ")[0]))
    return served, refused


def check(cfg: DictConfig, choices: dict[str, str] | None = None) -> int:
    """Print the report; the exit status (0: fits, 1: model and data do not fit)."""
    import numpy as np
    import torch

    from harness.components import build
    from harness.utils import seed_everything

    seed_everything(int(cfg.seed))
    choices = choices or {}
    print(f"harness.check: model={choices.get('model', cfg.model._target_)}, "
          f"dataset={choices.get('dataset', cfg.dataset._target_)}")
    data = build(cfg.dataset)
    if len(data) == 0:
        raise HarnessError("the dataset yielded no images" + (f" ({len(data.skipped)} skipped)" if data.skipped else ""))
    model = build(cfg.model)
    net = getattr(model, "net", model)
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        n_out = int(model.predict(model.preprocess(data.images[:1])[0]).shape[1])
    inner = f" ({type(net.model).__name__})" if hasattr(net, "model") and isinstance(net.model, torch.nn.Module) else ""
    print(f"model      {type(net).__name__}{inner}, {n_out} outputs, "
          f"{n_params:,} parameters, on {cfg.device}")
    print(f"preprocess {model.describe()}")
    warnings, status = [], 0
    print(f"data       {len(data)} images, sizes {_sizes(data.images)}"
          + (f"; {len(data.skipped)} skipped" if data.skipped else ""))
    for image_id, reason in data.skipped[:5]:
        print(f"           skipped {image_id}: {reason}")
    native = {im.shape[:2] for im in data.images}
    if native == {(model.input_size, model.input_size)} and model.resize not in (None, model.input_size):
        warnings.append(f"the images are {model.input_size}x{model.input_size}, the network's input size, but "
                        f"preprocessing resizes them to {model.resize} and crops ({model.sources.get('resize', '')}): "
                        "set model.resize=null to feed them as they are")
    small = max(max(im.shape[:2]) for im in data.images)
    if small * 2 <= model.input_size:
        warnings.append(f"the images are at most {small} px and preprocessing enlarges them to "
                        f"{model.resize or model.input_size} px ({model.sources.get('input_size', 'given')}): if the "
                        f"network was trained at their size, set model.input_size={small} (and model.resize=null)")
    labels = np.unique(data.labels)
    names = data.class_names
    print(f"classes    {len(names)} class names ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}), "
          f"{len(labels)} labels present, the model has {n_out} outputs")
    if labels.max() >= n_out:
        status = 1
        warnings.append(f"labels go up to {int(labels.max())} but the model has {n_out} outputs: the dataset's "
                        "classes are not the model's (dataset.classes_file, or model.num_classes)")
    elif len(names) != n_out:
        warnings.append(f"the dataset names {len(names)} classes and the model has {n_out} outputs: check that "
                        "label i is the model's output i (dataset.classes_file in the model's order)")
    k = len(data)
    x, _ = model.preprocess(data.images[:k])
    bs = int(cfg.batch_size)
    model.predict(x[: min(bs, k)], batch_size=bs)  # warm-up
    t0 = time.perf_counter()
    logits = model.predict(x, batch_size=bs)
    seconds = time.perf_counter() - t0
    pred = logits.argmax(1).numpy()
    acc = float((pred == data.labels[:k]).mean())
    print(f"accuracy   {100 * acc:.1f} % on {k} images (it predicts {len(np.unique(pred))} of {n_out} classes; "
          f"the most often predicted is {names[int(np.bincount(pred).argmax())] if int(np.bincount(pred).argmax()) < len(names) else int(np.bincount(pred).argmax())})")
    print(f"speed      {k / max(seconds, 1e-9):.1f} images/s forward at batch {bs} on {cfg.device} "
          f"(torch threads: {torch.get_num_threads()})")
    if k >= 20 and acc <= 1.5 / max(n_out, 1):
        warnings.append(f"accuracy {100 * acc:.1f} % is near chance ({100 / max(n_out, 1):.1f} %): wrong weights, "
                        "preprocessing (above) or class order?")
    served, refused = _xai(cfg, model)
    print(f"xai        serve this model: {', '.join(served)}")
    for name, reason in refused:
        print(f"           {name}: {reason[:160]}")
    for w in warnings:
        print(f"warning    {w}")
    return status


def compose_job(overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """The job config ``python -m harness`` would run for ``overrides``, resolved, without
    starting a Hydra app (nothing is written, no store is opened), and the option chosen in
    each group."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.choices...} in run_name
    choices = {str(g): str(o) for g, o in cfg.hydra.runtime.choices.items() if o is not None}
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg, choices


def main(argv: list[str] | None = None) -> int:
    """Check the command line's model and data; the exit status."""
    import logging

    from harness.validate import first_job_problem, open_keys, unknown_option

    argv = open_keys(list(sys.argv[1:] if argv is None else argv))
    if {"-m", "--multirun"} & set(argv):
        print("harness.check: error: checks one model and dataset: drop -m (sweeps are for python -m harness)",
              file=sys.stderr)
        return 2
    if problem := unknown_option(argv, CONF_DIR, CONF_DIR.parent / "experiments") or first_job_problem(argv, CONF_DIR):
        print(f"harness.check: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="           %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "datasets", "huggingface_hub", "fsspec",
                  "harness.models"):  # the models' own preprocessing line is the report's
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg, choices = exit_cleanly("harness.check", compose_job, argv)
    return exit_cleanly("harness.check", check, cfg, choices)


if __name__ == "__main__":
    sys.exit(main())
