"""``python -m harness.benchmark.metrics``: seconds per image of each evaluation metric, and two
ratios measured in the same process.

(a) ``ratio_raw``: our time over the model work the metric's algorithm needs: its
    ``forward_passes`` batched no-grad forwards per image (at the metric's own batch size), plus
    ``explanations_needed`` explanations per image by the benchmarked explainer (for metrics
    that re-explain), each timed here. Goal: at most 1.3.
(b) ``ratio_ref``: our time over Quantus 0.6.0's implementation at equal settings, for the
    metrics Quantus can run at our settings: SRG (Quantus ``RegionPerturbation``, MoRF plus
    LeRF, over every patch) and pixel flipping (Quantus ``PixelFlipping`` with the same number
    of steps: Quantus removes ``features_in_step`` channel values per step and requires it to
    divide ``H*W``, so at equal steps it removes the same share of the input per step, counted
    in channel values instead of pixels).

The maps scored are one explainer's (``xai``, default saliency), computed once. Ours, the
reference and the raw passes are timed alternately, ``repeats`` times each after a warm-up; the
fastest round counts.
"""

from __future__ import annotations

import csv
import logging
import sys
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from harness import CONF_DIR
from harness.benchmark.core import GOAL_RAW, _fmt, _hydra, _output_dir, _timed, benchmark_inputs, finish_row, raw_passes
from harness.types import HarnessError, exit_cleanly
from harness.utils import seed_everything, to_plain

log = logging.getLogger(__name__)

COLUMNS = ["metric", "s_per_image", "model_cost", "raw_s_per_image", "ratio_raw", "ref_s_per_image",
           "ratio_ref", "reference", "notes"]
HEADERS = ["metric", "s/img", "model cost/img", "raw s/img", "ratio a (raw)", "ref s/img", "ratio b (ref)",
           "reference", "notes"]


# Settings at which Quantus can run the same computation (``quantus_settings: true``).
QUANTUS_SETTINGS = {"SRG": {"steps": None, "replacement": 0.0}, "PixelFlipping": {"steps": 48, "replacement": 0.0}}


def compose_metrics(cfg: DictConfig) -> dict[str, DictConfig]:
    """Each benchmarked metric's node from ``conf/metrics/<name>.yaml`` with its
    ``metric_overrides`` on top (after :data:`QUANTUS_SETTINGS` where ``quantus_settings`` is
    true), resolved against ``cfg``. Unknown names fail here."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    with _hydra():
        options = sorted(GlobalHydra.instance().config_loader().get_group_options("metrics"))
        names = cfg.metric_names or options
        names = [names] if isinstance(names, str) else [str(m) for m in names]
        if unknown := [m for m in names if m not in options]:
            raise HarnessError(f"unknown metric(s) {', '.join(map(repr, unknown))} in metric_names; "
                               f"valid: {', '.join(options)}")
        extra = to_plain(cfg.metric_overrides) or {}
        if not (isinstance(extra, dict) and all(isinstance(v, dict) for v in extra.values())):
            raise HarnessError(f"metric_overrides must map metrics to their values, e.g. "
                               f"metric_overrides={{srg:{{steps:8}}}}; got {extra}")
        root = OmegaConf.to_container(cfg, resolve=False)
        nodes = {}
        for m in names:
            node = compose(config_name=None, overrides=[f"+metrics={m}"]).metrics[m]
            target = str(node.get("_target_", ""))
            if cfg.quantus_settings and target.endswith((".SRG", ".PixelFlipping")):
                node = OmegaConf.merge(node, QUANTUS_SETTINGS[target.rsplit(".", 1)[1]])
            node = OmegaConf.merge(node, extra.get(m, {}))
            full = OmegaConf.create({**root, "node": OmegaConf.to_container(node)})
            nodes[m] = full.node
        return {m: OmegaConf.create(OmegaConf.to_container(n, resolve=True)) for m, n in nodes.items()}


def quantus_reference(metric: Any, model: torch.nn.Module, x: torch.Tensor, a: np.ndarray, t: torch.Tensor):
    """``(label, fn)`` running Quantus' implementation of ``metric`` at its settings, or
    ``(reason, None)``."""
    import contextlib
    import io
    import warnings

    from harness.evaluation.perturbation import SRG, PixelFlipping

    if not isinstance(metric, SRG | PixelFlipping):
        return "n/a (Quantus has no implementation at these settings)", None
    if not isinstance(metric.replacement, float):
        return "n/a (Quantus' baselines are constants: set replacement to a number)", None
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import quantus
    n, c, h, w = x.shape
    xb, yb, ab = x.cpu().numpy(), t.cpu().numpy(), a[:, None].astype(np.float32)
    kw = dict(perturb_baseline=metric.replacement, disable_warnings=True)
    if isinstance(metric, SRG):
        if metric.steps is not None:
            return "n/a (Quantus removes one region per step: set steps to null)", None
        label = f"quantus.RegionPerturbation morf+lerf, patch_size={metric.patch_size}, every patch"
        metrics = [quantus.RegionPerturbation(patch_size=metric.patch_size, order=o, regions_evaluation=10**9, **kw)
                   for o in ("morf", "lerf")]
    else:
        steps = (h * w) // metric.patch_size**2 if metric.steps is None else int(metric.steps)
        f = c * h * w // steps
        if metric.patch_size != 1 or (c * h * w) % steps or (h * w) % f:
            return (f"n/a (Quantus needs features_in_step = C*H*W/steps to divide H*W; "
                    f"steps={steps} on {c}x{h}x{w} gives {c * h * w / steps:g})"), None
        label = f"quantus.PixelFlipping features_in_step={f} ({steps} steps)"
        metrics = [quantus.PixelFlipping(features_in_step=f, **kw)]

    def run() -> None:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.WARNING)  # Quantus logs at INFO on the root logger about softmax
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for m in metrics:
                m(model=model, x_batch=xb, y_batch=yb, a_batch=ab, channel_first=True, device=str(x.device),
                  softmax=metric.output == "softmax", batch_size=metric.batch_size)
        root.setLevel(level)
    return label, run


def bench_metric(name: str, metric: Any, model: torch.nn.Module, x: torch.Tensor, maps: np.ndarray,
                 t: torch.Tensor, masks: Any, explain_fn: Any, explain_s: float, cfg: DictConfig) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in COLUMNS} | {"metric": name, "status": "ok", "notes": ""}
    if metric.needs_masks and masks is None:
        return row | {"status": "n/a", "notes": "n/a (the dataset has no masks)"}
    if metric.needs_regions:  # a readout of the data's planted artifacts: nothing to time on the benchmark's data
        return row | {"status": "n/a", "notes": "n/a (reads the data's named regions)"}
    kwargs = {"explain": explain_fn} if metric.needs_explainer else {}
    n, dev = len(x), x.device
    fwd = metric.forward_passes(tuple(x.shape[-2:]))
    expl = metric.explanations_needed()
    row["model_cost"] = " + ".join(p for p in (f"{fwd} fwd" if fwd else "", f"{expl} explanations" if expl else "")
                                   if p) or "0"
    label, ref = quantus_reference(metric, model, x, maps, t) if cfg.reference else ("n/a (reference=false)", None)
    row["reference"] = label
    forward = None
    if fwd:
        batch = int(metric.batch_size or 64)
        forward, _ = raw_passes(model, x, t, batch)
    times: dict[str, list[float]] = {"ours": [], "ref": [], "fwd": []}
    ours = lambda: metric(model, x, maps, t, masks, **kwargs)  # noqa: E731
    try:
        ours()
        for fn in (forward, ref):
            if fn:
                fn()  # warm-up
        for _ in range(max(1, int(cfg.repeats))):
            times["ours"].append(_timed(ours, dev) / n)
            if ref:
                times["ref"].append(_timed(ref, dev) / n)
            if forward:
                times["fwd"].append(min(_timed(forward, dev) for _ in range(3)) / batch)
    except Exception as e:  # noqa: BLE001 - one broken metric must not stop the benchmark
        log.exception("metric %s failed", name)
        return row | {"status": "error", "notes": f"error: {type(e).__name__}: {str(e)[:300]}"}
    raw_s = (fwd * min(times["fwd"]) if fwd else 0) + expl * explain_s if (fwd or expl) else None
    return finish_row(row, min(times["ours"]), raw_s, min(times["ref"]) if times["ref"] else None,
                      [f"raw at batch {batch}"] if fwd else [], "slower than Quantus")


def table(rows: list[dict[str, Any]], sep: str = "  ") -> str:
    cells = [HEADERS, *[[_fmt(r[c], ratio=c.startswith("ratio")) for c in COLUMNS] for r in rows]]
    if sep == "|":
        lines = ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells]
        lines.insert(1, "|" + "---|" * len(HEADERS))
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "-" * max(map(len, lines)))
    return "\n".join(lines)


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Benchmark every metric of ``cfg.metric_names``; print the table, write CSV and markdown."""
    from tqdm.auto import tqdm

    from harness.components import build, check_capabilities
    from harness.xai.stage import explain
    from harness.xai.base import model_device

    nodes = compose_metrics(cfg)  # config errors before any work
    metrics = {name: build(node) for name, node in nodes.items()}
    data, model, n = benchmark_inputs(cfg)
    explainer = build(cfg.xai)
    check_capabilities(explainer, model)
    x, masks = model.preprocess(data.images[:n], data.masks[:n] if data.masks is not None else None)
    masks = masks if data.has_masks else None
    x = x.to(model_device(model))
    t = torch.from_numpy(data.labels[:n]).to(x.device)
    if cfg.target == "predicted":
        with torch.no_grad():
            t = model(x).argmax(1)
    explain_fn = lambda m, xx, tt: explain(explainer, m, xx, tt, int(cfg.batch_size), progress=False)  # noqa: E731
    explain_fn(model, x[:1], t[:1])  # warm-up
    explain_s = min(_timed(lambda: explain_fn(model, x, t), x.device) for _ in range(max(1, int(cfg.repeats)))) / n
    maps = explain_fn(model, x, t)

    rows = []
    for name in tqdm(list(metrics), desc="benchmark metrics", disable=None):
        seed_everything(cfg.seed)
        rows.append(bench_metric(name, metrics[name], model, x, maps, t, masks, explain_fn, explain_s, cfg))
        log.info("%s: %s", name, {k: v for k, v in rows[-1].items() if v is not None})

    context = {"images": n, "image_size": "x".join(map(str, x.shape[-2:])), "device": str(x.device),
               "xai": str(cfg.xai._target_).rsplit(".", 1)[-1], "explain_s_per_image": f"{explain_s:.3g}",
               "torch_threads": torch.get_num_threads(), "repeats": cfg.repeats, "torch": torch.__version__}
    out = _output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "benchmark_metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*COLUMNS, "status"])
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    ctx = ", ".join(f"{k}={v}" for k, v in context.items())
    (out / "benchmark_metrics.md").write_text(
        f"# Metric speed benchmark\n\n{ctx}\n\nratio a = s/img over the model work the metric needs "
        f"(goal <= {GOAL_RAW}); ratio b = s/img over Quantus at equal settings.\n\n{table(rows, '|')}\n")
    print(ctx)
    print(table(rows))
    print(f"ratio a: s/img over the model work the metric needs (goal <= {GOAL_RAW}); "
          "ratio b: s/img over Quantus at equal settings")
    print(f"written: {out / 'benchmark_metrics.csv'}, {out / 'benchmark_metrics.md'}")
    return rows


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="benchmark_metrics")
def main(cfg: DictConfig) -> None:
    rows = exit_cleanly("harness.benchmark.metrics", run, cfg)
    if failed := [r["metric"] for r in rows if r["status"] == "error"]:
        print(f"harness.benchmark.metrics: error: metric(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from harness.validate import open_keys

    sys.argv[1:] = open_keys(sys.argv[1:])  # model.kwargs.img_size=32 without a `+`
    main()
