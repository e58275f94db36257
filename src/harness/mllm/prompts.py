"""Prompt templates with named placeholders, checked when they are built (before a sweep runs)."""

from __future__ import annotations

import string

from harness.types import HarnessError

FIELDS = {
    "label": "the class the classifier predicted, in words",
    "true_label": "the image's labelled class, in words",
    "score": "the classifier's confidence in the predicted class, in percent",
    "method": "the XAI method that made the marks",
    "audience": "who the answer is for (the prompt's own `audience` value)",
    "classifier": "the classifier's name",
    "target": "the class a counterfactual was made to reach, in words (harness.counterfactual)",
}


def placeholders(template: str) -> list[str]:
    """The named fields of a ``str.format`` template (``{{``/``}}`` are literal braces)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise HarnessError(f"prompt template is malformed ({e}); write literal braces as {{{{ and }}}}") from None


class Prompt:
    """A prompt for the MLLM: ``template`` (and an optional ``system`` message) with named
    placeholders from :data:`FIELDS`.

    Unknown or positional placeholders are refused when the prompt is built, naming the valid
    ones, so a sweep never starts with a prompt it cannot fill. ``response_format: json`` marks
    prompts that ask for a JSON answer (the records then parse it).

    Args:
        template: the user message, e.g. ``"... classified this image as a {label}?"``.
        system: an optional system message (same placeholders).
        audience: the value of ``{audience}``.
        response_format: ``text`` or ``json``.
    """

    def __init__(self, template: str, system: str | None = None, audience: str = "a general audience",
                 response_format: str = "text") -> None:
        self.template, self.system, self.audience = str(template), system, str(audience)
        if response_format not in ("text", "json"):
            raise HarnessError(f"prompt.response_format={response_format!r} is not valid; valid: text, json")
        self.response_format = response_format
        for what, text in (("template", self.template), ("system", self.system or "")):
            names = placeholders(text)
            if bad := [n for n in names if n not in FIELDS]:
                shown = ", ".join("{" + n + "}" if n else "{} (positional)" for n in bad)
                raise HarnessError(f"prompt.{what} uses unknown placeholder(s) {shown}; valid: "
                                   + ", ".join("{" + f + "}" for f in FIELDS))
        if not self.template.strip():
            raise HarnessError("prompt.template is empty")

    def fields(self) -> set[str]:
        """The placeholders the template and system message use."""
        return {*placeholders(self.template), *placeholders(self.system or "")}

    def render(self, **values: object) -> tuple[str | None, str]:
        """``(system, user)`` messages with the placeholders filled."""
        values = {"audience": self.audience, **values}
        if missing := sorted({*placeholders(self.template), *placeholders(self.system or "")} - set(values)):
            raise HarnessError(f"prompt needs {', '.join(missing)} but no value was given")
        system = self.system.format(**values) if self.system else None
        return system, self.template.format(**values)
