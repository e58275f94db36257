"""FreeMCG with and without its learned manifold: the tables of experiments/freemcg/README.md.

    uv run python experiments/freemcg/results.py [--uri sqlite:///mlruns/mlflow.db] [--experiment freemcg]
        [--manifold N]

Table 1 reads the finished runs of ``python -m harness -m experiment=freemcg ...`` (README): per model and
dataset, the mean SRG (± sem) of each FreeMCG variant (denoiser and sigma: the data's DDPM, or none) and of
the random control, and the paired per-image gap of FreeMCG with the DDPM at ``--sigma`` to each (mean ± sem
and the gap in standard errors, z). Table 2 (``--manifold N``, computed here on the first N test images) is how far the
gradient estimates lie from the data manifold: the tangent residual ``|u - J_D u| / |u|`` of their unit
direction ``u`` under the data's denoiser D at a small noise level (``--manifold-sigma``, 0.05), whose
Jacobian approximates the projection onto the manifold's tangent space
(harness.xai.counterfactual.tangent_residual; 0: along the manifold, larger: removed by the denoiser as
noise), for FreeMCG with the DDPM (sigma 0.62) and without a denoiser (sigma 0.15), the autograd gradient
of log p and random Gaussian directions (the reference level of a direction with no structure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ROOT = Path(__file__).resolve().parents[2]
SETUPS = {("vit_tiny_shapes", "shapes"): "ddpm_shapes", ("cifar_resnet20", "cifar10"): "ddpm_cifar10"}


def per_image_srg(client, run_id: str, tmp: Path) -> dict[str, float]:
    path = client.download_artifacts(run_id, "per_image.json", str(tmp / run_id))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    return {r["image_id"]: float(r["srg"]) for r in rows}


def srg_table(uri: str, experiment: str, sigma: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"no experiment {experiment!r} in {uri}; run the commands of experiments/freemcg/README.md")
    found: dict[tuple[str, str], dict[str, str]] = {}
    for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=1000,
                                order_by=["attributes.start_time DESC"]):
        t = r.data.tags
        setup = (t.get("choice.model"), t.get("choice.dataset"))
        name = t.get("choice.xai")
        if name == "freemcg":
            name = f"{t.get('choice.xai/denoiser', '?')}@{float(r.data.params['xai.sigma']):g}"
        found.setdefault(setup, {}).setdefault(name, r.info.run_id)  # the newest run of each
    print("SRG, mean ± sem over the images; gaps paired per image: mean ± sem (z = mean / sem)\n")
    with tempfile.TemporaryDirectory() as tmp:
        for (model, dataset), runs in sorted(found.items()):
            den = SETUPS.get((model, dataset))
            best = f"{den}@{float(sigma):g}"
            print(f"{model} on {dataset}:")
            if best not in runs:
                print(f"  no run of FreeMCG with {best}; have {', '.join(sorted(runs))}\n")
                continue
            s = {k: per_image_srg(client, v, Path(tmp)) for k, v in runs.items()}
            ids = sorted(set.intersection(*(set(v) for v in s.values())))
            a = {k: np.array([v[i] for i in ids]) for k, v in s.items()}
            print(f"  | variant (denoiser@sigma) | SRG | {best} minus it (z) |")
            print("  |---|---|---|")
            for k in sorted(a, key=lambda k: -a[k].mean()):
                d = a[best] - a[k]
                se = d.std(ddof=1) / np.sqrt(len(d))
                g = "" if k == best else f"{d.mean():.3f} ± {se:.3f} ({d.mean() / se:.1f})"
                print(f"  | {k} | {a[k].mean():.3f} ± {a[k].std(ddof=1) / np.sqrt(len(ids)):.3f} | {g} |")
            print(f"  (n = {len(ids)} images)\n")


def manifold_table(n: int, sigma_m: float) -> None:
    import torch
    from hydra.utils import instantiate

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_cfg

    from harness.xai.counterfactual import tangent_residual

    print("\n| model | dataset | FreeMCG + DDPM | FreeMCG, no denoiser | autograd gradient | random direction |")
    print("|---|---|---|---|---|---|")
    for (model_name, dataset), den in SETUPS.items():
        try:
            cfg = make_cfg([f"model={model_name}", f"dataset={dataset}", f"dataset.n={n}", "xai=freemcg",
                            f"xai/denoiser={den}"])
            model, data = instantiate(cfg.model), instantiate(cfg.dataset)
        except Exception as e:  # noqa: BLE001 - e.g. the shared CIFAR-10 data is missing
            print(f"| {model_name} | {dataset} | not run: {e} | | | |")
            continue
        x, _ = model.preprocess(data.images)
        y = torch.from_numpy(data.labels)
        with_d = instantiate(cfg.xai)
        without = instantiate(make_cfg([f"model={model_name}", f"dataset={dataset}", "xai=freemcg",
                                        "xai/denoiser=none", "xai.sigma=0.15"]).xai)  # its better sigma
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xg).log_softmax(1).gather(1, y[:, None]).sum(), xg)
        dirs = {"ddpm": with_d.estimate_gradient(model, x, y), "none": without.estimate_gradient(model, x, y),
                "grad": grad, "random": torch.randn(x.shape, generator=torch.Generator().manual_seed(0))}
        r = {k: tangent_residual(with_d.denoiser, x, g, sigma_m) for k, g in dirs.items()}
        cells = [f"{v.mean():.3f} ± {v.std(ddof=1) / np.sqrt(len(v)):.3f}" for v in r.values()]
        print(f"| {model_name} | {dataset} | " + " | ".join(cells) + f" |  (n = {len(x)}, Jacobian at sigma {sigma_m})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", default=f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}")
    p.add_argument("--experiment", default="freemcg")
    p.add_argument("--sigma", default="0.62", help="the FreeMCG + DDPM run the others are compared with")
    p.add_argument("--manifold", type=int, default=0, help="also compute table 2 on this many test images")
    p.add_argument("--manifold-sigma", type=float, default=0.05,
                   help="noise level of the denoiser whose Jacobian is the tangent projection (small: close to it)")
    args = p.parse_args()
    srg_table(args.uri, args.experiment, args.sigma)
    if args.manifold:
        manifold_table(args.manifold, args.manifold_sigma)


if __name__ == "__main__":
    main()
