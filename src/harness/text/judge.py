"""An MLLM as judge: rubric scores, and whether the explanation alone lets it name the class."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from harness.mllm.base import MLLM, Record, Request
from harness.mllm.stage import parse_json
from harness.text.base import Context, TextMetric, words

RUBRIC = (
    "Here is an image and an explanation, written for {audience}, of why an AI system classified the image as "
    "\"{label}\":\n\n\"{text}\"\n\nRate the explanation from 1 (poor) to 5 (excellent) on: accuracy (is what it says "
    "true of the image?), completeness (does it say what matters for the decision?), clarity (can {audience} "
    "follow it?). Answer only with JSON: {{\"accuracy\": n, \"completeness\": n, \"clarity\": n}}")
SIMULATE = (
    "An AI system classified an image. Here is its explanation of the decision, with the class name removed:"
    "\n\n\"{text}\"\n\nWhich class did the AI system predict? Options: {options}. Answer with one option only.")
CRITERIA = ("accuracy", "completeness", "clarity")


def mask_label(text: str, label: str) -> str:
    """``text`` with the label (and its plural) replaced by ``[class]``."""
    import re

    name = r"\s+".join(map(re.escape, label.split()))
    return re.sub(rf"\b{name}(s|es)?\b", "[class]", text, flags=re.I) if label.strip() else text


class Judge(TextMetric):
    """Scores each answer with another MLLM (any ``mllm`` backend) as the judge.

    - ``judge_accuracy``, ``judge_completeness``, ``judge_clarity``: the judge's 1-5 rubric
      scores, asked with the image and the answer (NaN where its reply has no valid JSON);
    - ``judge_simulatability``: 1 if the judge, given only the answer with the class name masked
      and the dataset's classes as options, names the classifier's predicted class (the
      simulatability test of Hase & Bansal 2020), else 0.

    References:
        Zheng et al., "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", NeurIPS 2023.
        Hase & Bansal, "Evaluating Explainable AI: Which Algorithmic Explanations Help Users
        Predict Model Behavior?", ACL 2020.

    Args:
        mllm: the judge (a built backend; in YAML a nested ``mllm`` node).
        audience: who the explanation is for, in the rubric.
        rubric: ask for rubric scores.
        simulate: run the simulatability test.
    """

    family: ClassVar[str] = "judge"
    directions: ClassVar[dict[str, bool]] = {
        "judge_accuracy": True, "judge_completeness": True, "judge_clarity": True, "judge_simulatability": True}

    def __init__(self, mllm: MLLM, audience: str = "a general audience", rubric: bool = True,
                 simulate: bool = True) -> None:
        self.mllm, self.audience, self.rubric, self.simulate = mllm, str(audience), bool(rubric), bool(simulate)

    def __call__(self, records: list[Record], contexts: dict[str, Context]) -> dict[str, np.ndarray]:
        out = {k: np.full(len(records), np.nan) for k in self.directions}
        if self.rubric:
            reqs = [Request([contexts[r.image_id].image] if contexts[r.image_id].image is not None else [],
                            RUBRIC.format(audience=self.audience, label=contexts[r.image_id].label, text=r.text))
                    for r in records]
            for i, answers in enumerate(self.mllm.generate(reqs)):
                parsed = parse_json(answers[0].text) or {}
                for c in CRITERIA:
                    v = parsed.get(c)
                    if isinstance(v, int | float) and 1 <= v <= 5:
                        out[f"judge_{c}"][i] = float(v)
        if self.simulate:
            reqs = [Request([], SIMULATE.format(text=mask_label(r.text, contexts[r.image_id].label),
                                                options=", ".join(contexts[r.image_id].class_names)))
                    for r in records]
            for i, answers in enumerate(self.mllm.generate(reqs)):
                ctx = contexts[records[i].image_id]
                said = " " + " ".join(words(answers[0].text)) + " "
                hits = [c for c in ctx.class_names if f" {' '.join(words(c))} " in said]
                out["judge_simulatability"][i] = float(hits == [ctx.label])
        return out
