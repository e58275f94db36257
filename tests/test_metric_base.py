"""The metric interface: every option builds a Metric, capabilities cannot be misspelt, and the
one naming rule of logged scores (its clash message names a fix that works)."""

import inspect
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from harness import CONF_DIR
from harness.components import build
from harness.evaluation.base import CAPABILITIES, Metric
from harness.evaluation.perturbation import SRG
from harness.evaluation.pointing_game import PointingGame
from harness.evaluation.region_mass import RegionMass
from harness.evaluation.stage import evaluate, score_info
from harness.types import HarnessError, MetricOutput

OPTIONS = sorted(p.stem for p in (Path(CONF_DIR) / "metrics").glob("*.yaml"))


def _built(option: str) -> Metric:
    node = OmegaConf.load(Path(CONF_DIR) / "metrics" / f"{option}.yaml")[option]
    if "seed" in node:
        node.seed = 0  # ${seed} lives in the main config
    return build(node)


def test_every_option_builds_a_metric_named_after_the_option():
    assert len(OPTIONS) == 17
    for option in OPTIONS:
        metric = _built(option)
        assert isinstance(metric, Metric), option
        assert metric.name == option, option
        default = inspect.signature(type(metric)).parameters["name"].default
        assert isinstance(default, str) and default in OPTIONS, (option, default)


def test_capabilities_are_declared_only_where_they_differ_from_the_parent():
    classes = {type(_built(o)) for o in OPTIONS}
    seen = set()
    for cls in classes:
        for klass in cls.__mro__:
            if klass is Metric or not issubclass(klass, Metric) or klass in seen:
                continue
            seen.add(klass)
            parent = klass.__mro__[1]
            for cap in CAPABILITIES:
                if cap in vars(klass):
                    assert vars(klass)[cap] != getattr(parent, cap), f"{klass.__qualname__}.{cap} repeats its parent"


@pytest.mark.parametrize("attr", ["needs_mask", "need_masks", "higher_is_beter", "needs_explainers", "familly",
                                  "needs_gradients", "lower_is_better"])
def test_a_misspelt_capability_is_refused(attr):
    with pytest.raises(TypeError, match="not a metric capability"):
        type("Bad", (Metric,), {attr: True})


@pytest.mark.parametrize(("attr", "value"), [("needs_masks", "yes"), ("higher_is_better", 1),
                                             ("family", "faithfulnes"), ("family", 3)])
def test_a_capability_of_the_wrong_type_or_an_unknown_family_is_refused(attr, value):
    with pytest.raises(TypeError, match=attr):
        type("Bad", (Metric,), {attr: value})


def test_other_attributes_and_methods_are_allowed():
    class Fine(Metric):
        family: ClassVar[str] = "complexity"
        orders = ("morf",)
        batch_size = 8

        def forward_passes(self, image_size):
            return 3

    assert Fine("fine").forward_passes((4, 4)) == 3 and Fine.needs_masks is False


def test_a_bad_name_is_refused():
    with pytest.raises(HarnessError, match="name"):
        PointingGame(name="two words")


def test_evaluate_refuses_an_object_that_is_not_a_metric():
    class Duck:
        needs_masks = False

        def __call__(self, *a, **k):
            return MetricOutput(scores={"duck": np.zeros(1)})

    with pytest.raises(HarnessError, match=r"metric duck is a .*Duck, not a harness\.evaluation\.base\.Metric"):
        evaluate({"duck": Duck()}, None, torch.zeros(1, 3, 2, 2), np.zeros((1, 2, 2)), torch.zeros(1), None)


def test_a_metric_that_breaks_the_naming_rule_is_refused():
    class Loose(Metric):
        def __call__(self, model, x, a, t, masks=None):
            return MetricOutput(scores={"loose": np.zeros(len(x)), "other": np.zeros(len(x))})

    with pytest.raises(HarnessError, match=r"logs \['other'\].*<name> or <name>_<suffix>"):
        evaluate({"loose": Loose("loose")}, None, torch.zeros(1, 3, 2, 2), np.zeros((1, 2, 2)), torch.zeros(1), None)


def _masks_and_maps():
    masks = np.zeros((2, 6, 6), bool)
    masks[:, :3, :3] = True
    maps = np.zeros((2, 6, 6))
    maps[0, 1, 1] = maps[1, 5, 5] = 1.0
    return torch.zeros(2, 3, 6, 6), maps, masks


def _advice(message: str) -> tuple[str, str]:
    """The ``++metrics.<option>.name=<new>`` the message gives, as (option, new name)."""
    fix = message.rsplit(": ", 1)[1]
    key, new = fix.split("=")
    assert key.startswith("++metrics.") and key.endswith(".name"), message
    return key[len("++metrics."):-len(".name")], new


def test_two_metrics_of_one_name_clash_and_the_message_names_a_fix_that_works():
    """pointing_game had no name parameter: a second, stricter pointing game could not be added."""
    x, maps, masks = _masks_and_maps()
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(HarnessError) as e:
        evaluate({"pointing_game": PointingGame(), "strict": PointingGame(tolerance=0)}, None, x, maps, t, masks)
    msg = str(e.value)
    assert "metrics pointing_game and strict both log ['pointing_game']" in msg
    option, new = _advice(msg)
    assert (option, new) == ("strict", "strict")
    metrics = {"pointing_game": PointingGame(), option: PointingGame(tolerance=0, name=new)}
    res = evaluate(metrics, None, x, maps, t, masks)
    assert set(res["strict"].scores) == {"strict"}
    np.testing.assert_allclose(res["strict"].scores["strict"], [1, 0])
    assert score_info(metrics, res)["strict"] == {"metric": "strict", "family": "localisation",
                                                  "higher_is_better": True}


def test_scores_that_clash_across_names_are_refused_with_a_fix_that_works():
    """A region mass named ``box`` logs ``box_ratio``; a pointing game named ``box_ratio`` too."""
    x, maps, masks = _masks_and_maps()
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(HarnessError) as e:
        evaluate({"box": RegionMass(name="box"), "pg": PointingGame(name="box_ratio")}, None, x, maps, t, masks)
    msg = str(e.value)
    assert "metrics box and pg both log ['box_ratio']" in msg
    option, new = _advice(msg)
    res = evaluate({"box": RegionMass(name="box"), option: PointingGame(name=new)}, None, x, maps, t, masks)
    assert set(res["pg"].scores) == {new}


def test_the_advice_for_two_srgs_works():
    from torch import nn

    from harness.models.classifier import Classifier

    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)), input_size=8).eval()
    x, t = torch.rand(2, 3, 8, 8), torch.tensor([0, 2])
    maps = np.random.default_rng(0).random((2, 8, 8))
    with pytest.raises(HarnessError) as e:
        evaluate({"srg": SRG(patch_size=2), "srg_softmax": SRG(patch_size=2, output="softmax")}, model, x, maps, t, None)
    option, new = _advice(str(e.value))
    assert (option, new) == ("srg_softmax", "srg_softmax")
    res = evaluate({"srg": SRG(patch_size=2), option: SRG(patch_size=2, output="softmax", name=new)},
                   model, x, maps, t, None)
    assert {"srg", "srg_softmax", "srg_softmax_morf_auc"} <= {k for r in res.values() for k in r.scores}


def _metrics_from(options, overrides=()):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"metrics=[{','.join(options)}]", "seed=0", *overrides])
    return {k: build(v) for k, v in cfg.metrics.items()}


@pytest.mark.parametrize(("options", "overrides"), [
    # a node added on the command line, without a name key
    (["pointing_game"], ["+metrics.strict={_target_: harness.evaluation.pointing_game.PointingGame, tolerance: 0}"]),
    (["pointing_game", "sparseness"], ["metrics.sparseness.name=pointing_game"]),  # renamed into a clash
])
def test_the_advice_works_as_a_command_line_override(options, overrides):
    x, maps, masks = _masks_and_maps()
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(HarnessError) as e:
        evaluate(_metrics_from(options, overrides), None, x, maps, t, masks)
    fix = str(e.value).rsplit(": ", 1)[1]
    metrics = _metrics_from(options, [*overrides, fix])
    assert len(metrics) == 2
    res = evaluate(metrics, None, x, maps, t, masks)
    logged = [k for r in res.values() for k in r.scores]
    assert len(logged) == len(set(logged)) == len(metrics) and "pointing_game" in logged


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_can_be_renamed_on_the_command_line(option):
    assert _metrics_from([option], [f"metrics.{option}.name=renamed"])[option].name == "renamed"
