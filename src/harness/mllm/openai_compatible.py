"""A client for the OpenAI chat-completions protocol (vLLM, Ollama, llama.cpp server, hosted APIs)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from harness.mllm.base import MLLM, Answer, Request
from harness.types import HarnessError

log = logging.getLogger(__name__)


class MLLMError(HarnessError):
    """The endpoint could not give an answer (after the retries); the message says why."""


def _data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class OpenAICompatible(MLLM):
    """POST ``{base_url}/chat/completions`` with the rendered image(s) as PNG data URLs.

    Greedy decoding is sent as ``temperature: 0``; ``num_samples`` as ``n`` (servers that ignore
    ``n`` are asked again until there are enough answers). A request that times out, gets HTTP
    429 or 5xx, or a body that is not the protocol's JSON is retried up to ``max_retries`` times,
    waiting ``backoff_s * 2**attempt`` between tries; other HTTP errors (400, 401, 404 ...) fail at
    once. ``concurrency`` requests are in flight at a time. The API key is read from the
    environment variable named by ``api_key_env`` when a request is sent: it is never stored on
    the object, in params, tags, logs, records or error messages.

    Args:
        base_url: the server's API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the server knows.
        api_key_env: name of the environment variable holding the key (unset: no key sent).
        timeout_s: seconds to wait for one response.
        max_retries: retries after the first try.
        backoff_s: first wait between tries (doubles each time).
        concurrency: requests in flight at once.
        decoding: see :class:`~harness.mllm.base.Decoding`.
    """

    backend = "openai_compatible"

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_retries: int = 3, backoff_s: float = 1.0, concurrency: int = 4,
                 decoding: dict[str, Any] | None = None) -> None:
        super().__init__(model, decoding)
        if not str(base_url).startswith(("http://", "https://")):
            raise HarnessError(f"mllm.base_url={base_url!r} must start with http:// or https://")
        self.base_url = str(base_url).rstrip("/")
        self.api_key_env = api_key_env
        self.timeout_s, self.max_retries, self.backoff_s = float(timeout_s), int(max_retries), float(backoff_s)
        self.concurrency = max(1, int(concurrency))

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "base_url": self.base_url}

    def body(self, req: Request, n: int) -> dict[str, Any]:
        d = self.decoding
        content = [{"type": "text", "text": req.prompt}]
        content += [{"type": "image_url", "image_url": {"url": _data_url(img)}} for img in req.images]
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": content}]
        return {"model": self.model, "messages": messages, "max_tokens": d.max_new_tokens,
                "temperature": d.temperature if d.do_sample else 0.0, "top_p": d.top_p if d.do_sample else 1.0,
                "n": n, "seed": d.seed}

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                req = urllib.request.Request(f"{self.base_url}/chat/completions", data=data, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                try:
                    out = json.loads(raw)
                    out["choices"][0]["message"]["content"]  # noqa: B018 - the protocol's shape
                    return out
                except (ValueError, KeyError, IndexError, TypeError):
                    last = f"a response that is not chat-completions JSON: {raw[:200]!r}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}"
                if e.code != 429 and e.code < 500:
                    break
            except (TimeoutError, socket.timeout):
                last = f"no response within {self.timeout_s:g} s"
            except urllib.error.URLError as e:
                last = f"cannot connect ({e.reason})"
            log.warning("mllm %s at %s: %s (try %d of %d)", self.model, self.base_url, last, attempt + 1,
                        self.max_retries + 1)
        raise MLLMError(f"mllm {self.model} at {self.base_url} gave no answer: {last}")

    def _one(self, req: Request) -> list[Answer]:
        answers: list[Answer] = []
        while len(answers) < self.decoding.num_samples:
            t0 = time.perf_counter()
            out = self._post(self.body(req, self.decoding.num_samples - len(answers)))
            latency = time.perf_counter() - t0
            usage = out.get("usage") or {}
            choices = out["choices"]
            for ch in choices:
                answers.append(Answer(str(ch["message"]["content"] or ""), latency / len(choices),
                                      usage.get("prompt_tokens"), usage.get("completion_tokens"),
                                      ch.get("finish_reason")))
        return answers[: self.decoding.num_samples]

    def generate(self, requests: list[Request]) -> list[list[Answer]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, requests))
