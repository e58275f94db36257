"""The interface every image metric implements: :class:`Metric`."""

from __future__ import annotations

import difflib
import re
from typing import Any, ClassVar

import numpy as np

from harness.types import HarnessError, MetricOutput

#: The families reports group scores by.
FAMILIES = ("faithfulness", "robustness", "randomisation", "complexity", "localisation", "other")

#: Capability metadata: name -> type. Declared on :class:`Metric`, overridden where a metric differs.
CAPABILITIES: dict[str, type] = {"family": str, "higher_is_better": bool, "needs_masks": bool,
                                 "needs_explainer": bool, "needs_regions": bool}

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class Metric:
    """Base of the image metrics: ``metric(model, x, maps, targets, masks, **kwargs) -> MetricOutput``.

    As in Quantus' ``Metric``: metadata is declared once, as class variables, and each metric
    overrides only what differs; hyper-parameters go to ``__init__`` (from the option's YAML);
    data goes to ``__call__``.

    Capabilities, read by the metrics stage (:func:`harness.evaluation.stage.evaluate`) and the
    reports:
        family: the group reports put the scores in, one of :data:`FAMILIES`.
        higher_is_better: the direction of the scores; a score whose direction differs is named
            in ``MetricOutput.higher_is_better``.
        needs_masks: the metric scores against ground-truth object masks; it is skipped (with a
            warning) on a dataset without them.
        needs_explainer: the metric explains (perturbed) inputs again; ``__call__`` then gets
            ``explain=fn`` with ``fn(model, x, targets) -> maps``.
        needs_regions: the metric reads the dataset's named regions (``ImageSet.regions``, e.g.
            a planted artifact's pixels); ``__call__`` then gets ``regions={name: [N, H, W]}``
            as network-input masks (empty when the data has none).

    A subclass attribute that looks like a capability but is none (``needs_mask``,
    ``higher_is_beter``, ``needs_gradients``, ``lower_is_better``) or a capability of the wrong
    type is refused when the class is defined, so a misspelling cannot silently switch one off.

    Naming rule of the logged scores: every metric takes ``name`` (its constructor's default is
    the metric's option name in ``conf/metrics/``), and each score and curve it logs is
    ``<name>`` or ``<name>_<suffix>`` (``srg``, ``srg_morf_auc``; ``region_mass_ratio``). Two
    metrics of one run that would log the same score are told apart by giving one of them
    another name: ``metrics.<option>.name=<new name>`` (every option's YAML writes ``name``);
    the stage refuses a run where scores clash, naming the override that fixes it, and a metric
    whose output breaks the rule.

    Cost, for the benchmark (:mod:`harness.benchmark.metrics`):
        forward_passes: images pushed through the model per explained image, at ``batch_size``
            per call (0: the metric reads only the maps).
        explanations_needed: extra explanations per image (for ``needs_explainer`` metrics).

    Args:
        name: prefix of the logged scores and curves (see the naming rule above).
    """

    family: ClassVar[str] = "other"
    higher_is_better: ClassVar[bool] = True
    needs_masks: ClassVar[bool] = False
    needs_explainer: ClassVar[bool] = False
    needs_regions: ClassVar[bool] = False

    #: Images per model call, for metrics that call the model (set by their ``__init__``).
    batch_size: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr, value in vars(cls).items():
            if attr.startswith("__"):
                continue
            if attr in CAPABILITIES:
                kind = CAPABILITIES[attr]
                if not isinstance(value, kind):
                    raise TypeError(f"{cls.__qualname__}.{attr} must be a {kind.__name__}, got {value!r}")
                if attr == "family" and value not in FAMILIES:
                    raise TypeError(f"{cls.__qualname__}.family={value!r} is not a known family; "
                                    f"valid: {', '.join(FAMILIES)}")
                continue
            close = difflib.get_close_matches(attr, CAPABILITIES, n=1, cutoff=0.8)
            if close or attr.startswith(("needs_", "need_")) or attr.endswith("_is_better"):
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"{cls.__qualname__}.{attr} is not a metric capability (known: "
                                f"{', '.join(CAPABILITIES)}){hint}")

    def __init__(self, name: str) -> None:
        self.name = check_name(name)

    def __call__(self, model: Any, x: Any, attributions: np.ndarray, targets: Any,
                 masks: np.ndarray | None = None, **kwargs: Any) -> MetricOutput:
        raise NotImplementedError

    def forward_passes(self, image_size: tuple[int, int]) -> int:
        """Images pushed through the model per explained image for inputs of ``image_size``."""
        return 0

    def explanations_needed(self) -> int:
        """Extra explanations per image."""
        return 0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def check_name(name: Any) -> str:
    """A metric's ``name``: letters, digits, ``_``, ``-`` and ``.``, starting with a letter or
    digit (MLflow accepts it as a metric key)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise HarnessError(f"a metric's name must be letters, digits, '_', '-' or '.', got {name!r}")
    return name


def follows_naming_rule(name: str, key: str) -> bool:
    """Is ``key`` ``<name>`` or ``<name>_<suffix>``?"""
    return key == name or (key.startswith(f"{name}_") and len(key) > len(name) + 1)
