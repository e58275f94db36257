"""Concept Relevance Propagation and the concept atlas: conservation, known answers on a model
that learnt a shortcut, PCX prototypes, the job's concept stage, and the real classifiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SHARED, make_cfg
from harness.data.shapes import _MARK_COLOURS, make_shapes
from harness.models.cifar_resnet import CifarResNet
from harness.models.classifier import Classifier
from harness.xai.concepts import build_atlas, concept_faithfulness, prototypes
from harness.xai.crp import CRP
from harness.xai.lrp import LRP
from harness.xai.transformer_lrp import TransformerLRP


def tensor(images) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def tiny_cnn(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(CifarResNet(depth=8, num_classes=4), input_size=32).eval()


def tiny_vit() -> Classifier:
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32, patch_size=8,
                            embed_dim=32, depth=3, num_heads=2)
    return Classifier(net, input_size=32).eval()


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def batch():
    s = make_shapes(n=3, seed=5)
    return tensor(s.images), torch.tensor([0, 3, 1])


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_all_concept_maps_add_up_to_the_lrp_map(arch, batch):
    """Conservation: the conditional maps of every channel of the layer sum to the
    unconditional LRP (CNN) or AttnLRP (ViT) map, which is the plain method's own map."""
    x, t = batch
    model = tiny_cnn() if arch == "cnn" else tiny_vit()
    crp = CRP(top_k=3)
    before = hooks(model)
    full, rel, _ = crp.layer_relevance(model, x, t)
    plain = (LRP() if arch == "cnn" else TransformerLRP()).explain(model, x, t)
    torch.testing.assert_close(full, plain.sum(1) if plain.ndim == 4 else plain)
    every = crp.conditional(model, x, t, torch.arange(rel.shape[1]).repeat(len(x), 1))
    scale = float(full.abs().max())
    assert float((every.sum(1) - full).abs().max()) <= 1e-5 * scale
    if arch == "cnn":  # zennit's rules: a concept's map carries the concept's relevance
        c = crp.concepts(model, x, t)
        torch.testing.assert_close(c.maps.flatten(2).sum(2), c.relevance.gather(1, c.ids), rtol=1e-4, atol=1e-7)
        assert c.ids.shape == (3, 3) and (c.shares.abs() <= 1).all()
        assert torch.equal(crp.explain(model, x, t), c.maps.sum(1))  # the job's map: the top-k concepts' part
    assert hooks(model) == before  # nothing left behind


def test_a_bad_layer_or_setting_is_refused_before_work():
    model = tiny_cnn()
    assert "xai.layer='layer9' is not a module of CifarResNet" in CRP(layer="layer9").unsupported(model)
    assert CRP().unsupported(model) is None
    with pytest.raises(Exception, match=r"xai.top_k=0 is not valid"):
        CRP(top_k=0)


def _train(spurious: float, steps: int = 120, seed: int = 0) -> Classifier:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same floating-point order, and so the same model, on any machine setting
    try:
        return _fit(spurious, steps, seed)
    finally:
        torch.set_num_threads(before)


def _fit(spurious: float, steps: int, seed: int) -> Classifier:
    model = tiny_cnn(seed)
    s = make_shapes(n=768, split="train", spurious_prob=spurious)
    x, y = tensor(s.images), torch.as_tensor(s.labels)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def shortcut_models():
    """A small CNN trained with the class-coloured corner mark on every image, one without."""
    return {"mark": _train(1.0), "clean": _train(0.0)}


def _marked(images, labels) -> np.ndarray:
    colours = (np.asarray(_MARK_COLOURS) * 255).round()
    return np.array([np.abs(im[:3, :3].astype(float) - colours[k]).max() <= 1 for im, k in zip(images, labels)])


def test_the_shortcut_is_a_concept_of_the_shortcut_model_only(shortcut_models):
    """Reference images half with the mark: the mark-trained model's most relevant concept has
    its reference images on the mark (>= 90 %, boxes in the corner); no top concept of the
    clean model does. Concept faithfulness is far above a random ordering for both."""
    ref = make_shapes(n=256, split="val", spurious_prob=0.5)
    x, y = tensor(ref.images), torch.as_tensor(ref.labels)
    has_mark = _marked(ref.images, ref.labels)
    assert 0.4 < has_mark.mean() < 0.6
    on_mark = {}
    for name, model in shortcut_models.items():
        crp = CRP(top_k=3)
        atlas = build_atlas(crp, model, x, y, top_m=10)
        share = []
        for c in atlas.top_concepts(5):
            idx = atlas.by_relevance[c]
            ok = idx >= 0
            in_corner = (atlas.relevance_boxes[c][ok][:, :2] < 3).all(1)
            share.append(float((has_mark[idx[ok]] & in_corner).mean()) if ok.any() else 0.0)
        on_mark[name] = share
        con = crp.concepts(model, x[:24], y[:24])
        faithful = np.nanmean(concept_faithfulness(crp, model, x[:24], y[:24], con.relevance))
        shuffled = con.relevance[:, torch.randperm(con.relevance.shape[1], generator=torch.Generator().manual_seed(0))]
        random_order = np.nanmean(concept_faithfulness(crp, model, x[:24], y[:24], shuffled))
        assert faithful > 0.6 and faithful > random_order + 0.5, (name, faithful, random_order)
    assert on_mark["mark"][0] >= 0.9, on_mark
    assert max(on_mark["clean"]) < 0.9, on_mark


def test_concepts_by_region_and_their_stability(shortcut_models):
    """With the shapes' object and mark masks: the mark-trained model's top concepts sit mostly on
    the mark (relevance per pixel), the clean model's on the object or background; split halves
    of the reference set agree on which concepts matter."""
    from harness.cache import StageCache
    from harness.xai.concept_stage import concept_stage

    test = make_shapes(n=8, split="test", spurious_prob=0.5)
    x, y = tensor(test.images), torch.as_tensor(test.labels)
    out = {}
    for name, model in shortcut_models.items():
        crp = CRP(top_k=2, reference=make_shapes(n=256, split="val", spurious_prob=0.5), top_m=4, n_concepts=6)
        r = concept_stage(crp, model, x, y, y, StageCache(None), predictions_key="k", model_key=name, config={},
                          seed=0, batch_size=64, n_views=0)
        assert list(r.atlas.region_names) == ["object", "mark", "background"]
        top = r.atlas.region_shares[r.atlas.top_concepts(10)]  # computed for the 10 most relevant concepts
        np.testing.assert_allclose(top.sum(1), 1.0, atol=1e-6)
        out[name] = dict(r.summary)
        out[name]["mark_share"] = float(top[:, list(r.atlas.region_names).index("mark")].mean())
    # measured: 10 and 2 of 10 concepts, mean mark shares 0.93 and 0.31 (0.31 also with 2 training threads)
    assert out["mark"]["concepts_in_mark"] >= 8 and out["clean"]["concepts_in_mark"] <= 5, out
    assert out["mark"]["mark_share"] > 0.8 and out["clean"]["mark_share"] < 0.5, out
    assert out["mark"]["concept_separation"] > 0.6
    for s in out.values():
        assert s["concept_stability_spearman"] > 0.5 and s["concept_stability_top10"] > 0.3, out


def test_prototypes_flag_an_image_unlike_its_class():
    rng = np.random.default_rng(0)
    a = np.abs(rng.normal([5, 1, 1, 0.1], 0.3, size=(40, 4)))
    b = np.abs(rng.normal([0.1, 1, 1, 5], 0.3, size=(40, 4)))
    vectors, classes = np.concatenate([a, b]), np.array([0] * 40 + [1] * 40)
    protos = prototypes(vectors, classes, n_prototypes=2)
    assert set(protos.classes) == {0, 1} and protos.means[0].shape == (2, 4)
    own = protos.distance(vectors, classes)
    odd = protos.distance(b[:5], np.zeros(5, int))  # class-1 evidence called class 0
    assert odd.min() > np.percentile(own, 99)
    assert (protos.nearest(vectors[:3], classes[:3]) >= 0).all()
    assert prototypes(vectors[:1], classes[:1]).means[0].shape == (1, 4)  # one image: its own prototype


@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_a_crp_job_logs_concepts_atlas_and_scores(tmp_path, model):
    from mlflow import MlflowClient

    from harness.pipeline import run

    arch = (["model=torchvision", "model.name=resnet18", "model.num_classes=4", "model.input_size=32"]
            if model == "cnn" else
            ["model=timm", "model.name=vit_tiny_patch16_224", "model.num_classes=4",
             *(f"model.kwargs.{k}" for k in ("img_size=32", "patch_size=8", "embed_dim=32", "depth=3", "num_heads=2"))])
    cfg = make_cfg([*arch, "dataset=shapes", "dataset.n=6", "xai=crp", "xai.top_k=2", "xai.n_concepts=6",
                    "metrics=[srg]", "metrics.srg.steps=4", "~mllm", "isolation=never", "resume=false",
                    f"cache.dir={tmp_path}/stages", f"paths.cache_dir={tmp_path}/cache", "max_overlays=2",
                    f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a"])
    summary = run(cfg, {"tags": {}, "choices": {}, "output_dir": None})
    for key in ("concept_faithfulness", "top_concept_share", "prototype_distance", "prototype_outlier"):
        assert np.isfinite(summary[key]), key
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    (r,) = client.search_runs(["1"])
    names = {a.path for a in client.list_artifacts(r.info.run_id)} | {
        a.path for a in client.list_artifacts(r.info.run_id, "concepts")}
    assert {"concepts.json", "atlas.npz", "concepts/atlas.png", "concepts/prototypes.png"} <= names
    assert sum(n.startswith("concepts/shapes") for n in names) == 2
    again = run(cfg, {"tags": {}, "choices": {}, "output_dir": None})  # the stages come from the cache
    assert again["cache_hits_atlas"] == 1 and again["cache_hits_concepts"] == 1
    assert again["concept_faithfulness"] == pytest.approx(summary["concept_faithfulness"])


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real test data not found at {SHARED}")
@pytest.mark.parametrize(("model", "dataset", "n"), [("cifar_resnet20", "cifar10", 64),
                                                      ("mobilenet_v2_imagenet", "imagenet_samples", 12)])
def test_atlases_of_the_real_classifiers(model, dataset, n, tmp_path):
    from harness.components import build

    cfg = make_cfg([f"model={model}", f"dataset={dataset}", f"dataset.n={n}", f"paths.shared_data={SHARED}"])
    clf, data = build(cfg.model), build(cfg.dataset)
    x, _ = clf.preprocess(data.images)
    y = torch.as_tensor(data.labels)
    crp = CRP(top_k=3)
    atlas = build_atlas(crp, clf, x, y, top_m=4, batch_size=8)
    assert atlas.layer in ("layer3.2.relu2", "features.18.2")
    assert atlas.by_relevance.shape[1] == 4 and (atlas.by_relevance[atlas.top_concepts(5)] >= 0).all()
    assert np.isfinite(atlas.mean_relevance).all() and atlas.mean_relevance.max() > 0
    boxes = atlas.relevance_boxes[atlas.top_concepts(5)]
    assert ((boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])).all()
    assert (boxes[..., 2] <= x.shape[-2]).all() and (boxes[..., 3] <= x.shape[-1]).all()


def test_the_verbaliser_names_where_the_shortcut_concept_lives(shortcut_models, tmp_path):
    """render=concepts and the verbaliser on the mark-trained model: the picture has a row per
    concept, and the words say the top concept's reference patches sit in the upper left."""
    from harness.cache import StageCache
    from harness.mllm.base import Request
    from harness.mllm.verbaliser import Verbaliser
    from harness.render.views import Concepts
    from harness.xai.concept_stage import concept_stage

    model = shortcut_models["mark"]
    test = make_shapes(n=8, split="test", spurious_prob=1.0)
    x, y = tensor(test.images), torch.as_tensor(test.labels)
    crp = CRP(top_k=3, reference=make_shapes(n=128, split="val", spurious_prob=0.5), top_m=6, n_concepts=8)
    result = concept_stage(crp, model, x, y, y, StageCache(None), predictions_key="k", model_key="m", config={},
                           seed=0, batch_size=64, n_views=2)
    assert len(result.views) == 2 and len(result.views[0]) == 3
    (picture,) = Concepts(size=None)(x[0].numpy().transpose(1, 2, 0), np.zeros((32, 32)), result.views[0])
    assert picture.size[1] == 4 * (72 + 6)  # the image and one row per concept
    req = Request([picture], "", None, np.ones((32, 32)), "circle", 90.0, None, result.views[0])
    (answer,), = Verbaliser().generate([req])
    assert "It relied most on 3 concepts. 1. Concept" in answer.text
    first = answer.text.split("1. Concept")[1].split("2. Concept")[0]
    assert "in the upper left (" in first and "of their images" in first, first


def test_render_concepts_needs_a_concept_explainer():
    from harness.components import build_components
    from harness.types import HarnessError

    with pytest.raises(HarnessError, match=r"render=concepts draws an image's concepts.*use it with xai=crp"):
        build_components(make_cfg(["render=concepts", "xai=ig", "dataset=npz", "dataset.path=/nonexistent.npz"]))
