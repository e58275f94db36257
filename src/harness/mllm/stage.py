"""The language stage of a job: render each explanation, ask the MLLM, keep every answer.

Answers are cached by content: the key is a hash of the rendered image(s) (PNG bytes), the
system and user messages, and the backend's identity (backend, model, revision, decoding ...),
so re-running the same combination costs nothing and any change that could change an answer
misses the cache. Entries are written to a temporary file and renamed, so a killed job never
leaves half an entry.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from harness.mllm.base import MLLM, Answer, Record, Request
from harness.ownership import temp_name
from harness.types import HarnessError

log = logging.getLogger(__name__)


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def cache_key(req: Request, identity: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for img in req.images:
        h.update(hashlib.sha256(png_bytes(img)).digest())
    h.update(json.dumps([req.system, req.prompt, identity], sort_keys=True, default=str).encode())
    return h.hexdigest()


class AnswerCache:
    """Answers on disk under ``root/answers/<key[:2]>/<key>.json`` (``root=None``: no cache)."""

    def __init__(self, root: str | Path | None) -> None:
        self.dir = None if root is None else Path(root) / "answers"

    def get(self, key: str) -> list[Answer] | None:
        if self.dir is None:
            return None
        path = self.dir / key[:2] / f"{key}.json"
        try:
            return [Answer(**a) for a in json.loads(path.read_text())]
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            log.warning("answer cache entry %s is unreadable (%s): asking again", path, e)
            return None

    def put(self, key: str, answers: list[Answer]) -> None:
        if self.dir is None:
            return
        folder = self.dir / key[:2]
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / temp_name(f"{key}.json")  # names its owner: a killed job's is removed later
        with open(tmp, "w") as fh:
            json.dump([asdict(a) for a in answers], fh)
        os.replace(tmp, folder / f"{key}.json")


def parse_json(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text`` (models wrap it in prose or code fences), or None."""
    start = text.find("{")
    while start != -1:
        for end in [m.end() for m in re.finditer(r"\}", text[start:])][::-1]:
            try:
                out = json.loads(text[start : start + end])
                return out if isinstance(out, dict) else None
            except ValueError:
                continue
        start = text.find("{", start + 1)
    return None


def ask(mllm: MLLM, requests: list[Request], ids: list[str], cache: AnswerCache,
        rendered_names: list[list[str]], json_answers: bool = False) -> list[Record]:
    """Answers for ``requests`` (from the cache where present), as records."""
    identity = mllm.identity()
    keys = [cache_key(r, identity) for r in requests]
    found = {i: a for i, k in enumerate(keys) if (a := cache.get(k)) is not None}
    todo = [i for i in range(len(requests)) if i not in found]
    if todo:
        from tqdm.auto import tqdm

        chunk = max(1, getattr(mllm, "batch_size", 8))
        for s in tqdm(range(0, len(todo), chunk), desc=f"ask ({mllm.backend})", disable=None):
            part = todo[s : s + chunk]
            for i, answers in zip(part, mllm.generate([requests[i] for i in part])):
                cache.put(keys[i], answers)
                found[i] = answers
    log.info("mllm %s: %d answers asked, %d from the cache", mllm.model, len(todo), len(requests) - len(todo))
    records = []
    for i, req in enumerate(requests):
        for s, a in enumerate(found[i]):
            records.append(Record(
                image_id=ids[i], sample=s, text=a.text, prompt=req.prompt, system=req.system, backend=mllm.backend,
                model=mllm.model, decoding=mllm.decoding.as_dict(), latency_s=a.latency_s,
                prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens, finish_reason=a.finish_reason,
                rendered=rendered_names[i], cache_key=keys[i], cached=i not in todo,
                parsed=parse_json(a.text) if json_answers else None))
    return records


def summary(records: list[Record], json_answers: bool = False) -> dict[str, float]:
    """Run-level numbers of the language stage."""
    if not records:
        return {}
    fresh = [r for r in records if not r.cached]
    out = {"n_answers": float(len(records)), "answer_cache_hits": float(sum(r.cached for r in records)),
           "answer_words_mean": float(np.mean([len(r.text.split()) for r in records]))}
    if fresh:
        out["answer_latency_s_mean"] = float(np.mean([r.latency_s for r in fresh]))
    if json_answers:
        out["answer_json_valid"] = float(np.mean([r.parsed is not None for r in records]))
    return out


def image_hosts(language: Any) -> dict[str, str]:
    """``{role: host}`` of the remote endpoints that receive images in the language stage: the
    MLLM and any text metric that asks one (a judge). Local models send nothing anywhere."""
    from urllib.parse import urlparse

    askers = {"mllm": language.mllm, **{f"text_metrics.{k}": getattr(m, "mllm", None)
                                        for k, m in language.text_metrics.items()}}
    return {role: urlparse(url).hostname or url for role, m in askers.items()
            if isinstance(m, MLLM) and (url := m.identity().get("base_url"))}


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_privacy(language: Any, allow_hosts: list[str]) -> None:
    """With privacy on: refuse, before any work, to send images to a host that is neither
    loopback nor in ``allow_hosts``."""
    for role, host in image_hosts(language).items():
        if not is_loopback(host) and host not in allow_hosts:
            raise HarnessError(f"privacy.enabled: {role} would send images to {host}, which is not loopback; "
                               f"allow it with privacy.allow_hosts=[{host}] or use a local endpoint")


def language_stage(language: Any, data: Any, x: Any, maps: np.ndarray, preds: Any, logits: Any,
                   masks: np.ndarray | None, rec: Any, *, n_images: int | None, method: str, classifier: str,
                   cache_dir: Any, private: bool = False, concepts: list[list[Any]] | None = None,
                   ) -> tuple[list[Record], dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Render the first ``n_images`` explanations (None: all) with ``language`` (a
    :class:`harness.components.Language`), ask the MLLM about each, score the answers, and log
    the rendered images (``rendered/``; not with ``private``) and the answers with their scores
    (table ``answers.json``, ``answers.jsonl``). ``method`` and ``classifier`` are how the prompt
    names them. ``concepts`` (``xai=crp``): each image's concepts, for ``render=concepts`` and the
    verbaliser. Returns the records, the text scores (one value per record) and their metadata."""
    import pandas as pd
    from PIL import Image

    from harness.text.base import Context
    from harness.tracking.artifacts import safe_name

    n = len(data) if n_images is None else min(len(data), int(n_images))
    names = data.class_names
    name_of = lambda i: names[i] if 0 <= i < len(names) else str(i)  # noqa: E731
    probs = logits.softmax(1)
    requests, files = [], []
    with rec.folder("rendered") as tmp:
        for i in range(n):
            p = int(preds[i])
            score = float(probs[i, p]) * 100
            system, user = language.prompt.render(label=name_of(p), true_label=name_of(int(data.labels[i])),
                                                  score=f"{score:.0f}", method=method, classifier=classifier)
            own = concepts[i] if concepts is not None and i < len(concepts) else None
            extra = {"concepts": own} if getattr(language.renderer, "needs_concepts", False) else {}
            images = language.renderer(x[i].numpy().transpose(1, 2, 0), maps[i], **extra)
            files.append([] if private else
                         [f"rendered/{i:05d}_{safe_name(data.ids[i])}_{j}.png" for j in range(len(images))])
            for img, f in zip(images, files[-1]):
                if not private:
                    img.save(tmp / Path(f).name)
            requests.append(Request(images, user, system, maps[i], name_of(p), score,
                                    None if masks is None else masks[i], own))
    json_answers = language.prompt.response_format == "json"
    records = ask(language.mllm, requests, data.ids[:n], AnswerCache(cache_dir), files, json_answers)
    contexts = {data.ids[i]: Context(requests[i].label, list(names), maps[i], requests[i].mask,
                                     Image.fromarray((x[i].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)))
                for i in range(n)}
    scores: dict[str, np.ndarray] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, metric in language.text_metrics.items():
        out = metric(records, contexts)
        for k in out:
            info[k] = {"metric": name, "family": metric.family, "higher_is_better": bool(metric.directions.get(k, True))}
        scores.update(out)
    rows = [{**asdict(r), **{k: float(v[j]) for k, v in scores.items()}} for j, r in enumerate(records)]
    rec.text("\n".join(json.dumps(r, default=str) for r in rows) + "\n", "answers.jsonl")
    table = pd.DataFrame([{**r, "decoding": json.dumps(r["decoding"]), "rendered": " ".join(r["rendered"]),
                           "parsed": json.dumps(r["parsed"]) if r["parsed"] is not None else ""} for r in rows])
    rec.table(table, "answers.json")
    return records, scores, info
