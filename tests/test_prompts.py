"""Prompt templates: every shipped one renders; bad placeholders are clear config errors."""

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from conftest import make_cfg, run_harness
from harness import CONF_DIR
from harness.mllm.prompts import FIELDS, Prompt
from harness.types import HarnessError

VALUES = {"label": "tabby cat", "true_label": "tabby cat", "score": "93", "method": "lime", "classifier": "vit",
          "target": "tabby cat"}


def prompt_options():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return sorted(GlobalHydra.instance().config_loader().get_group_options("prompt"))


def test_every_shipped_prompt_renders():
    options = prompt_options()
    assert {"paper", "general_audience", "security_analyst", "expert", "structured"} <= set(options)
    for option in options:
        system, user = instantiate(make_cfg([f"prompt={option}"]).prompt).render(**VALUES)
        assert "{" not in user.replace('{"', "").replace("{{", "") and "tabby cat" in user, option
    paper = instantiate(make_cfg(["prompt=paper"]).prompt).render(**VALUES)[1]
    assert paper == ("Given the marked areas in the image, why do you think an AI system classified this image "
                     "as a tabby cat?")
    structured = instantiate(make_cfg(["prompt=structured"]).prompt)
    assert structured.response_format == "json" and '{"regions"' in structured.render(**VALUES)[1]


def test_a_job_refuses_the_counterfactual_prompt_before_it_runs():
    """{target} is filled by harness.counterfactual only: a job says so when it is built."""
    from harness.components import build_components

    with pytest.raises(HarnessError, match=r"uses \{target\}.*harness.counterfactual"):
        build_components(make_cfg(["prompt=counterfactual"]))


def test_unknown_placeholder_is_a_config_error_naming_the_valid_ones():
    with pytest.raises(HarnessError, match=r"unknown placeholder\(s\) \{lable\}.*valid: \{label\}"):
        Prompt("Why is this a {lable}?")
    with pytest.raises(HarnessError, match="positional"):
        Prompt("Why is this a {}?")
    with pytest.raises(HarnessError, match="malformed"):
        Prompt("Answer as JSON {regions: []")
    with pytest.raises(HarnessError, match="needs method"):
        Prompt("{label} by {method}").render(label="cat")
    assert set(FIELDS) >= {"label", "score", "method", "audience"}


def test_bad_prompt_stops_before_any_work(tmp_path):
    r = run_harness("prompt.template='Why is this a {lable}?'", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                    f"tracking.artifact_location={tmp_path}/a", f"hydra.run.dir={tmp_path}/run", "dataset.n=2")
    assert r.returncode == 1 and "harness: error: prompt.template uses unknown placeholder(s) {lable}" in r.stderr
    assert "Traceback" not in r.stderr
