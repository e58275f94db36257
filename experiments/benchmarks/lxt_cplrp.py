"""Reference timing for CP-LRP: LXT (the AttnLRP authors' package) on torchvision's ViT.

LXT cannot be installed next to the harness (it fails to import with transformers 5 and supports
only torchvision's ViT), so this runs in a throw-away environment:

    uv run --isolated --no-project --with lxt --with 'transformers<5' --with torch --with torchvision \
        python experiments/benchmarks/lxt_cplrp.py

It prints LXT's CP-LRP (ε) seconds per image and its ratio to one plain gradient of the same
torchvision model, with ViT-Ti/16 dimensions at 224 px (random weights). Compare that ratio with
the ``cplrp`` row of ``python -m harness.benchmark model=timm model.name=vit_tiny_patch16_224
'methods=[cplrp]' 'xai_overrides={cplrp:{rule:epsilon}}'``. LXT patches torchvision's classes for
the whole process with no undo, so the plain gradient is timed first.
"""

import time

import torch
from torchvision.models import vision_transformer


def per_image(fn, x, repeats=3):
    fn(x)  # warm-up
    best = min(_timed(fn, x) for _ in range(repeats))
    return best / len(x)


def _timed(fn, x):
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def gradient_x_input(model, x):
    x = x.detach().requires_grad_(True)
    out = model(x)
    out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
    return (x * x.grad).sum(1)


def main(n=8, threads=1):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = vision_transformer.VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=3,
                                                 hidden_dim=192, mlp_dim=768, num_classes=1000).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        model.heads.head.weight.normal_(std=0.02)  # torchvision zero-initialises the head
    x = torch.rand(n, 3, 224, 224)
    plain = per_image(lambda t: gradient_x_input(model, t), x)

    from lxt.efficient import monkey_patch
    from lxt.efficient.models.vit_torch import cp_LRP

    monkey_patch(vision_transformer, cp_LRP)
    lxt = per_image(lambda t: gradient_x_input(model, t), x)
    print(f"images={n} threads={threads} torch={torch.__version__}")
    print(f"plain gradient  {plain:.4f} s/img")
    print(f"LXT CP-LRP      {lxt:.4f} s/img   ratio to one gradient {lxt / plain:.2f}")


if __name__ == "__main__":
    main()
