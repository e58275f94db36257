"""A sweep's runs side by side in the MLflow UI: one link to its runs table with the option
choices that vary and each headline score (mean and sem) as columns, sorted by the first score.

The link uses the UI's *shared view*: an experiment tag ``mlflow.sharedViewState.<key>`` holds
the table's state as JSON, and ``#/experiments/<id>/runs?viewStateShareKey=<key>`` opens it
(what the UI's own "share" button writes; MLflow 3). ``workflowType=machine_learning`` opens the
classic runs view rather than the GenAI one. A shared view changes no user's saved view.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import quote

from harness.evaluation.base import FAMILIES

VIEW_TAG = "mlflow.sharedViewState."
CLASSIC = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where ``mlflow ui`` serves by default
MAX_SCORES = 24  # columns beyond these make the table unreadable; the rest stay one click away


def _col(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"


def sweep_filter(sweep_id: str, run_ids: list[str], max_len: int = 4000) -> str:
    """The search filter that lists a sweep's runs: by run id (a resumed sweep's skipped jobs
    have their runs in an earlier sweep), or by the ``sweep_id`` tag where the ids would make
    the filter longer than ``max_len`` (MLflow keeps 5000 characters of an experiment tag)."""
    by_id = "attributes.run_id IN (" + ", ".join(f"'{r}'" for r in sorted(run_ids)) + ")"  # a set: one key
    return by_id if run_ids and len(by_id) <= max_len else f"tags.sweep_id = '{sweep_id}'"


def sweep_view(runs: list[Any], search_filter: str, first_score: str | None = None) -> tuple[str, dict[str, Any]]:
    """The shared view of a sweep's runs: ``(key, state)``. Columns: the ``choice.<group>`` tags
    whose option differs between the runs, ``accuracy``, and each score (a metric with a
    ``higher_is_better.<score>`` tag) with its ``_sem``; sorted by ``first_score`` (when the runs
    have it) in its better direction; rows: the runs ``search_filter`` finds."""
    tags = [r.data.tags for r in runs]
    groups = sorted({k for t in tags for k in t if k.startswith("choice.") and "@" not in k})
    varying = [g for g in groups if len({t.get(g) for t in tags}) > 1]
    metrics = {k for r in runs for k in r.data.metrics}
    direction = {k.removeprefix("higher_is_better."): v == "true" for t in tags for k, v in t.items()
                 if k.startswith("higher_is_better.")}
    family = {k.removeprefix("family."): v for t in tags for k, v in t.items() if k.startswith("family.")}
    rank = {f: i for i, f in enumerate(FAMILIES)}  # the image metrics' families, then the text's
    scores = sorted((s for s in direction if s in metrics),
                    key=lambda s: (s != first_score, rank.get(family.get(s, ""), len(rank)), family.get(s, ""), s))
    scores = scores[:MAX_SCORES]
    columns = [_col("tags", g) for g in varying] + [_col("metrics", "accuracy")] \
        + [_col("metrics", m) for s in scores for m in (s, f"{s}_sem") if m in metrics]
    state: dict[str, Any] = {"selectedColumns": columns, "columnOrder": columns, "searchFilter": search_filter}
    if scores:
        state |= {"orderByKey": _col("metrics", scores[0]), "orderByAsc": not direction[scores[0]]}
    return view_key(search_filter), state


def view_key(search_filter: str) -> str:
    """The shared view's key: one per set of rows (the same runs, the same view)."""
    return "harness-" + hashlib.sha256(search_filter.encode()).hexdigest()[:12]


def publish_view(client: Any, experiment_id: str, key: str, state: dict[str, Any]) -> None:
    client.set_experiment_tag(experiment_id, VIEW_TAG + key, json.dumps(state))


def ui_base(tracking_uri: str) -> str:
    """The UI's address for a tracking URI: a server's own, else ``mlflow ui``'s default."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI


def view_url(tracking_uri: str, experiment_id: str, key: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?viewStateShareKey={quote(key)}&{CLASSIC}"


def how_to_open(tracking_uri: str) -> str:
    """What to start first so that :func:`view_url` answers ('' for a server)."""
    if tracking_uri.startswith(("http://", "https://")):
        return ""
    return f"after `uv run mlflow ui --backend-store-uri {tracking_uri}`"
