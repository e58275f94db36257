"""The speed benchmark: seconds per image of each XAI method, and two ratios measured in the
same process.

(a) ``ratio_raw``: our time over the raw model work the method's algorithm needs
    (:meth:`~harness.xai.base.Explainer.model_cost`: ``forward`` batched no-grad passes and
    ``backward`` batched forward+backward passes per image, each timed here at the batch size
    the method itself uses). Goal: at most 1.3.
(b) ``ratio_ref``: our time over the reference implementation at equal settings
    (:mod:`harness.benchmark.refs`). Goal: below 1.

Ours, the reference and the raw passes are timed alternately, ``repeats`` times each after a
warm-up; the fastest round counts (the least disturbed by other load on the machine).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from harness import CONF_DIR
from harness.types import HarnessError
from harness.utils import seed_everything, to_plain

log = logging.getLogger(__name__)

GOAL_RAW = 1.3
COLUMNS = ["method", "s_per_image", "raw_s_per_image", "ratio_raw", "ref_s_per_image", "ratio_ref",
           "model_cost", "reference", "notes"]
HEADERS = ["method", "s/img", "raw s/img", "ratio a (raw)", "ref s/img", "ratio b (ref)",
           "model cost/img", "reference", "notes"]


@contextmanager
def _hydra() -> Iterator[None]:
    """Hydra's config loader on ``conf/``: the running app's, or one set up for a plain call."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield


def xai_options() -> list[str]:
    """The options of the ``xai`` config group (the registry of methods)."""
    from hydra.core.global_hydra import GlobalHydra

    with _hydra():
        return sorted(GlobalHydra.instance().config_loader().get_group_options("xai"))


def compose_methods(cfg: DictConfig) -> dict[str, DictConfig]:
    """Each benchmarked method's ``xai`` node, composed from ``conf/xai/<name>.yaml`` with its
    ``xai_overrides`` and resolved against ``cfg`` (``${seed}`` ...). Unknown names fail here."""
    from hydra import compose
    from omegaconf.errors import ConfigKeyError

    options = xai_options()
    methods = cfg.methods or options
    methods = [methods] if isinstance(methods, str) else [str(m) for m in methods]
    unknown = [m for m in methods if m not in options]
    if unknown:
        raise HarnessError(f"unknown method(s) {', '.join(map(repr, unknown))} in methods; "
                           f"valid: {', '.join(options)}")
    extra = to_plain(cfg.xai_overrides) or {}
    if not (isinstance(extra, dict) and set(extra) <= set(methods)
            and all(isinstance(v, dict) for v in extra.values())):
        raise HarnessError(f"xai_overrides must map benchmarked methods ({', '.join(methods)}) to their "
                           f"values, e.g. xai_overrides={{lime:{{num_samples:200}}}}; got {extra}")
    root = OmegaConf.to_container(cfg, resolve=True)
    nodes = {}
    with _hydra():
        for m in methods:
            node = compose(config_name=None, overrides=[f"+xai={m}"]).xai
            try:
                node = OmegaConf.merge(node, extra.get(m, {}))
            except ConfigKeyError as e:
                raise HarnessError(f"xai_overrides.{m}: {str(e).splitlines()[0]} "
                                   f"(keys of conf/xai/{m}.yaml: {', '.join(map(str, node))})") from None
            full = OmegaConf.create({**root, "xai": OmegaConf.to_container(node)})
            nodes[m] = full.xai
    return nodes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def explain_in_chunks(fn: Callable[[torch.Tensor, torch.Tensor], Any], x: torch.Tensor, t: torch.Tensor,
                      batch_size: int) -> None:
    """``fn`` on ``x`` ``batch_size`` images at a time, as :func:`harness.xai.stage.explain` calls."""
    for i in range(0, len(x), batch_size):
        fn(x[i : i + batch_size], t[i : i + batch_size])


def raw_passes(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, batch: int
               ) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """A batched no-grad forward and a batched forward+backward (gradient of the target logits
    with respect to the input) on ``batch`` images cycled from ``x``."""
    reps = math.ceil(batch / len(x))
    xb, tb = x.repeat(reps, 1, 1, 1)[:batch].contiguous(), t.repeat(reps)[:batch]

    def forward() -> None:
        with torch.no_grad():
            model(xb)

    def backward() -> None:
        xg = xb.detach().requires_grad_(True)
        with torch.enable_grad():
            out = model(xg).gather(1, tb[:, None]).sum()
            torch.autograd.grad(out, xg)

    return forward, backward


def model_batch(explainer: Any, images_per_call: int, passes_per_image: float) -> int:
    """Images per model call the method uses: its own ``batch_size`` / ``internal_batch_size``
    (bounded by the passes one call needs), else the images per explainer call."""
    own = getattr(explainer, "batch_size", None) or getattr(explainer, "internal_batch_size", None)
    if not own:
        return images_per_call
    return int(max(1, min(int(own), math.ceil(images_per_call * max(passes_per_image, 1)))))


def denoiser_pass(explainer: Any, x: torch.Tensor, batch: int) -> Callable[[], Any]:
    """A batched call of the explainer's denoiser on ``batch`` noisy images cycled from ``x``."""
    reps = math.ceil(batch / len(x))
    sigma = float(explainer.sigma)
    zb = (x.repeat(reps, 1, 1, 1)[:batch] + sigma * torch.randn_like(x.repeat(reps, 1, 1, 1)[:batch])).contiguous()

    def denoise() -> None:
        with torch.no_grad():
            explainer.denoiser(zb, sigma)

    return denoise


def _cost_text(cost: Any) -> str:
    parts = [f"{v:g} {what}" for v, what in ((cost.forward, "fwd"), (cost.backward, "fwd+bwd"),
                                             (getattr(cost, "denoiser", 0.0), "denoiser")) if v]
    return " + ".join(parts) or "0"


def bench_method(name: str, explainer: Any, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                 cfg: DictConfig) -> dict[str, Any]:
    """One row of the table for one method (``status`` ok, n/a or error)."""
    from harness.benchmark.refs import NoReference, reference
    from harness.components import check_capabilities
    from harness.xai.base import model_device

    row: dict[str, Any] = {c: None for c in COLUMNS} | {"method": name, "status": "ok", "notes": ""}
    notes: list[str] = []
    dev = model_device(model)
    try:
        check_capabilities(explainer, model)
    except HarnessError as e:
        return row | {"status": "n/a", "reference": "n/a", "notes": f"n/a ({e})"}
    n, per_call = len(x), max(1, min(int(cfg.batch_size), len(x)))
    cost = explainer.model_cost(tuple(x.shape[-2:]))
    row["model_cost"] = _cost_text(cost) if cost is not None else "n/a"

    ref_fn = None
    if not cfg.reference:
        row["reference"] = "n/a (reference=false)"
    else:
        try:
            row["reference"], ref_fn = reference(explainer, model, x[:per_call])
            ref_fn(x[:1], t[:1])  # warm-up
        except NoReference as e:
            row["reference"], ref_fn = f"n/a ({e})", None
        except Exception as e:  # noqa: BLE001 - a broken reference must not stop the benchmark
            log.exception("reference of %s failed", name)
            row["reference"], ref_fn = f"n/a (failed: {type(e).__name__}: {str(e)[:200]})", None
    ours = lambda xb, tb: explainer(model, xb, tb)  # noqa: E731
    raw: dict[str, tuple[Callable[[], Any], float]] = {}  # "fwd"/"fb" -> (pass, count per image)
    batch = 0
    times: dict[str, list[float]] = {"ours": [], "ref": [], "fwd": [], "fb": [], "denoiser": []}
    try:
        if cost is not None and (cost.forward or cost.backward):
            batch = model_batch(explainer, per_call, max(cost.forward, cost.backward))
            fwd, fb = raw_passes(model, x, t, batch)
            raw = {k: v for k, v in (("fwd", (fwd, cost.forward)), ("fb", (fb, cost.backward))) if v[1]}
            if cost.denoiser:
                raw["denoiser"] = (denoiser_pass(explainer, x, batch), cost.denoiser)
        for fn, _ in raw.values():
            fn()  # warm-up
        ours(x[:1], t[:1])  # warm-up
        for _ in range(max(1, int(cfg.repeats))):
            times["ours"].append(_timed(lambda: explain_in_chunks(ours, x, t, per_call), dev) / n)
            if ref_fn is not None:
                try:
                    times["ref"].append(_timed(lambda: explain_in_chunks(ref_fn, x, t, per_call), dev) / n)
                except Exception as e:  # noqa: BLE001
                    log.exception("reference of %s failed", name)
                    row["reference"], ref_fn = f"n/a (failed: {type(e).__name__}: {str(e)[:200]})", None
                    times["ref"] = []
            for key, (fn, _) in raw.items():
                times[key].append(min(_timed(fn, dev) for _ in range(3)) / batch)
    except Exception as e:  # noqa: BLE001 - one broken method must not stop the benchmark
        log.exception("method %s failed", name)
        return row | {"status": "error", "notes": f"error: {type(e).__name__}: {str(e)[:300]}"}
    if raw:
        notes.append(f"raw at batch {batch}")
    raw_s = sum(k * min(times[key]) for key, (_, k) in raw.items()) if raw else None
    return finish_row(row, min(times["ours"]), raw_s, min(times["ref"]) if times["ref"] else None, notes,
                      "slower than the reference")


def finish_row(row: dict[str, Any], ours_s: float, raw_s: float | None, ref_s: float | None,
               notes: list[str], slower: str) -> dict[str, Any]:
    """Fill a row's times and ratios (fastest rounds, per image) and flag the goals missed."""
    row["s_per_image"] = ours_s
    if raw_s:
        row["raw_s_per_image"], row["ratio_raw"] = raw_s, ours_s / raw_s
        if row["ratio_raw"] >= GOAL_RAW + 0.005:
            notes.append(f"ratio a over the {GOAL_RAW} goal")
    if ref_s:
        row["ref_s_per_image"], row["ratio_ref"] = ref_s, ours_s / ref_s
        if row["ratio_ref"] >= 1.005:  # as printed: 1.00 is a tie
            notes.append(slower)
    row["notes"] = "; ".join(notes)
    return row


def _fmt(v: Any, ratio: bool = False) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.2f}" if ratio else f"{v:.3g}"
    return str(v)


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[_fmt(r[c], ratio=c.startswith("ratio")) for c in COLUMNS] for r in rows]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table, one line per method."""
    cells = [HEADERS, *table_rows(rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADERS) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


def markdown(rows: list[dict[str, Any]], context: dict[str, Any]) -> str:
    head = "| " + " | ".join(HEADERS) + " |\n|" + "---|" * len(HEADERS) + "\n"
    body = "".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |\n" for r in table_rows(rows))
    ctx = ", ".join(f"{k}={v}" for k, v in context.items())
    return (f"# XAI speed benchmark\n\n{ctx}\n\nratio a = s/img over the raw model passes the "
            f"algorithm needs (goal <= {GOAL_RAW}); ratio b = s/img over the reference "
            f"implementation at equal settings (goal < 1).\n\n{head}{body}")


def _output_dir(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path.cwd()


def benchmark_inputs(cfg: DictConfig) -> tuple[Any, torch.nn.Module, int]:
    """The dataset, the model and the number of images to time, with the shared checks."""
    from harness.components import build

    if int(cfg.n_images) < 1:
        raise HarnessError(f"n_images={cfg.n_images} must be at least 1")
    if cfg.target not in ("label", "predicted"):
        raise HarnessError(f"target={cfg.target!r} is not valid; valid: label, predicted")
    seed_everything(cfg.seed)
    data = build(cfg.dataset)
    if len(data) == 0:
        raise HarnessError("the dataset yielded no images")
    return data, build(cfg.model), min(int(cfg.n_images), len(data))


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    """Benchmark every method of ``cfg.methods``; print the table, write CSV and markdown."""
    from tqdm.auto import tqdm

    from harness.components import build
    from harness.xai.base import model_device

    logging.getLogger("shap").setLevel(logging.WARNING)  # KernelExplainer logs every solve at INFO
    nodes = compose_methods(cfg)  # config errors before any work
    explainers = {name: build(node) for name, node in nodes.items()}
    data, model, n = benchmark_inputs(cfg)
    x, _ = model.preprocess(data.images[:n])
    x = x.to(model_device(model))
    labels = torch.from_numpy(data.labels[:n]).to(x.device)
    with torch.no_grad():
        t = labels if cfg.target == "label" else model(x).argmax(1)

    rows = []
    for name in tqdm(list(explainers), desc="benchmark", disable=None):
        seed_everything(cfg.seed)
        rows.append(bench_method(name, explainers[name], model, x, t, cfg))
        log.info("%s: %s", name, {k: v for k, v in rows[-1].items() if v is not None})

    context = {"images": n, "image_size": "x".join(map(str, x.shape[-2:])), "device": str(x.device),
               "torch_threads": torch.get_num_threads(), "repeats": cfg.repeats,
               "batch_size": cfg.batch_size, "torch": torch.__version__}
    out = _output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "benchmark.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*COLUMNS, "status"])
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    (out / "benchmark.md").write_text(markdown(rows, context))
    print(", ".join(f"{k}={v}" for k, v in context.items()))
    print(format_table(rows))
    print(f"ratio a: s/img over the raw model passes (goal <= {GOAL_RAW}); "
          f"ratio b: s/img over the reference (goal < 1)")
    print(f"written: {out / 'benchmark.csv'}, {out / 'benchmark.md'}")
    return rows
