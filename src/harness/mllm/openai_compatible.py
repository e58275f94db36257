"""A client for the OpenAI chat-completions protocol (vLLM, Ollama, llama.cpp server, hosted APIs)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from harness.mllm.base import MLLM, Answer, Request
from harness.types import HarnessError

log = logging.getLogger(__name__)

#: The redirect statuses; a same-origin one is followed (the POST repeated), at most MAX_REDIRECTS times.
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
DEFAULT_PORTS = {"http": 80, "https": 443}


class MLLMError(HarnessError):
    """The endpoint could not give an answer (after the retries); the message says why."""


class _Failure(Exception):
    """One try went wrong: ``message`` says how, ``retry`` whether another try may help."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.message, self.retry = message, retry


@dataclass
class _Reply:
    """A validated chat-completions response: ``(content, finish_reason)`` per choice, and the usage."""

    choices: list[tuple[str, str | None]]
    prompt_tokens: int | None
    completion_tokens: int | None


def _data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# --- the deadline -------------------------------------------------------------------------------
# httpx's timeouts bound each socket operation, not a request: a server that sends a byte now and
# then (in the headers or the body) keeps every read short and the request alive for ever. So the
# client's transport wraps the network streams, and every connect, TLS handshake, read and write
# waits at most until the deadline of the request its thread is sending (a thread sends one
# request at a time). Name resolution (getaddrinfo) cannot be bounded this way.

_deadline = threading.local()


def _left(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` cut to what is left before this thread's deadline; ``error`` once it passed."""
    at = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname,
                                                      _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout),
                                                       local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout),
                                                               socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _Transport(httpx.HTTPTransport):
    """httpx's transport, its connections opened through :class:`_DeadlineBackend`."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        pool = getattr(self, "_pool", None)  # httpx's connection pool (httpcore), not public API
        self.deadline_installed = isinstance(getattr(pool, "_network_backend", None), httpcore.NetworkBackend)
        if self.deadline_installed:
            pool._network_backend = _DeadlineBackend(pool._network_backend)
        else:  # another httpx/httpcore layout: only the body is checked against the deadline
            log.warning("mllm: cannot bound each socket operation by the request's deadline with this httpx; "
                        "timeout_s bounds each read, and the body as a whole")


def _proxy_for(url: httpx.URL) -> str | None:
    """The proxy the environment names for ``url`` (``https_proxy``, ``no_proxy`` ...), as urllib reads it."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(f"{url.host}:{_origin(url)[2]}"):
        return None
    return proxy


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    return url.scheme, url.host, url.port or DEFAULT_PORTS.get(url.scheme, 0)


def _origin_text(url: httpx.URL) -> str:
    scheme, host, port = _origin(url)
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


# --- the key in httpx's and httpcore's own log lines ----------------------------------------------
# They log what the server sends (httpcore, at DEBUG: the response headers; httpx, at INFO: the
# status line). A server that echoes the key there would have it logged, so while a request is
# under way its key is replaced in their records.


class _ScrubKeys(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._keys: dict[str, int] = {}  # the keys of the requests under way, with their number

    def add(self, key: str) -> None:
        with self._lock:
            self._keys[key] = self._keys.get(key, 0) + 1

    def remove(self, key: str) -> None:
        with self._lock:
            if self._keys.get(key, 0) > 1:
                self._keys[key] -= 1
            else:
                self._keys.pop(key, None)

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            keys = list(self._keys)
        if keys:
            msg = record.getMessage()
            if any(k in msg for k in keys):
                for k in keys:
                    msg = msg.replace(k, "[redacted]")
                record.msg, record.args = msg, ()
        return True


_scrub_keys = _ScrubKeys()
for _name in ("httpx", "httpcore", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy",
              "httpcore.socks"):
    logging.getLogger(_name).addFilter(_scrub_keys)


# --- the response's schema ----------------------------------------------------------------------

_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
          bool: "a boolean", type(None): "null"}


def _kind(v: Any) -> str:
    """What JSON value ``v`` is, with a short excerpt: ``a string ('lots')``."""
    kind = _KINDS.get(type(v), type(v).__name__)
    if isinstance(v, dict | list):
        return kind
    text = repr(v)
    return f"{kind} ({text[:40] + '...' if len(text) > 40 else text})" if v is not None else kind


def _bad(what: str) -> _Failure:
    return _Failure(f"a response that is not chat-completions JSON: {what}", retry=True)


def _server_error(out: dict[str, Any]) -> str:
    err = out.get("error")
    msg = err.get("message") if isinstance(err, dict) else err
    text = " ".join(str(msg).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def _parse(raw: bytes) -> _Reply:
    """The answers in a chat-completions body, or a :class:`_Failure` naming what deviates."""
    try:
        out = json.loads(raw)
    except (ValueError, RecursionError):
        raise _bad(f"not JSON: {raw[:200]!r}{'...' if len(raw) > 200 else ''}") from None
    if not isinstance(out, dict):
        raise _bad(f"the body is {_kind(out)}, not an object")
    if "choices" not in out:
        if "error" in out:
            raise _bad(f"no choices, the server reports an error: {_server_error(out)}")
        raise _bad(f"no 'choices' (keys: {', '.join(sorted(map(str, out))[:10]) or 'none'})")
    choices = out["choices"]
    if not isinstance(choices, list):
        raise _bad(f"choices is {_kind(choices)}, not an array")
    if not choices:
        raise _bad("choices is empty")
    answers = []
    for i, ch in enumerate(choices):
        if not isinstance(ch, dict):
            raise _bad(f"choices[{i}] is {_kind(ch)}, not an object")
        if "message" not in ch:
            raise _bad(f"choices[{i}] has no 'message'")
        msg = ch["message"]
        if not isinstance(msg, dict):
            raise _bad(f"choices[{i}].message is {_kind(msg)}, not an object")
        content = msg.get("content")  # null (e.g. a refusal or tool call): an empty answer
        if content is not None and not isinstance(content, str):
            raise _bad(f"choices[{i}].message.content is {_kind(content)}, not a string")
        finish = ch.get("finish_reason")
        if finish is not None and not isinstance(finish, str):
            raise _bad(f"choices[{i}].finish_reason is {_kind(finish)}, not a string")
        answers.append((content or "", finish))
    usage = out.get("usage")
    if usage is None:
        usage = {}
    if not isinstance(usage, dict):
        raise _bad(f"usage is {_kind(usage)}, not an object")
    tokens = []
    for k in ("prompt_tokens", "completion_tokens"):
        v = usage.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise _bad(f"usage.{k} is {_kind(v)}, not a non-negative integer")
        tokens.append(v)
    return _Reply(answers, *tokens)


class OpenAICompatible(MLLM):
    """POST ``{base_url}/chat/completions`` with the rendered image(s) as PNG data URLs.

    Greedy decoding is sent as ``temperature: 0``; ``num_samples`` as ``n`` (servers that ignore
    ``n`` are asked again until there are enough answers). ``concurrency`` requests are in flight
    at a time.

    **Deadline and size.** ``timeout_s`` bounds one try as a whole: connecting, sending, the
    redirects it follows and receiving the last byte; a server that sends slowly, a byte now and
    then in the headers or the body, gets the timeout at the deadline too (each retry has its own
    ``timeout_s``; resolving the host name is not bounded). The response body may have at most
    ``max_response_bytes`` bytes: a larger ``Content-Length`` is refused before the body is read,
    and a body without one is read at most one network read (64 KiB) past the limit. Responses
    are asked without compression (``Accept-Encoding: identity``), so the limit is the size held.

    **Retries.** These are retried up to ``max_retries`` times, waiting ``backoff_s * 2**attempt``
    between tries: the deadline passed, the connection failed, HTTP 429 or 5xx, and a body that is
    not the protocol's JSON. Each deviation from the schema is named in the error (not JSON; not an
    object; no ``choices`` or an empty or non-array one; a choice without a ``message`` object;
    ``content`` neither a string nor null; ``finish_reason`` neither a string nor null; ``usage``
    not an object; token counts that are not non-negative integers); a null ``content`` is an empty
    answer. These fail at once: other HTTP statuses (400, 401, 404 ...), a redirect to another
    origin, more than ``MAX_REDIRECTS`` redirects, a body over ``max_response_bytes`` and a
    compressed body (the same request would get them again). Every failure ends in
    :class:`MLLMError`.

    **Redirects.** A redirect (301, 302, 303, 307, 308) to the same origin (scheme, host and port
    of ``base_url``) is followed, the POST repeated with its body (a GET would not be a chat
    completion), at most ``MAX_REDIRECTS`` times. A redirect to another origin, an ``http`` to
    ``https`` upgrade included, is refused with an error naming that origin: following it would
    hand the request (the images and prompts) to a server the user did not name, with the key or,
    were the key dropped, without it, where an endpoint that needs one answers 401 all the same.
    Set ``base_url`` to the address the server points to, if it is the right one.

    **The key** is read from the environment variable named by ``api_key_env`` when a request is
    sent (surrounding whitespace dropped; spaces or control characters in it are an error) and is
    sent only to ``base_url``'s origin. It is never stored on the object, in params, tags, logs,
    records or error messages: should a server echo it, in an answer, an error page, a header or
    the status line, it is replaced by ``[redacted]`` before anything is parsed, quoted, logged
    (httpx's and httpcore's log lines included) or stored.
    Proxies are taken from the environment (``https_proxy``, ``no_proxy`` ...) as urllib reads it.

    Args:
        base_url: the server's API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the server knows.
        api_key_env: name of the environment variable holding the key (unset: no key sent).
        timeout_s: seconds one try may take, from connecting to the last byte of the answer.
        max_retries: retries after the first try.
        backoff_s: first wait between tries (doubles each time).
        concurrency: requests in flight at once.
        decoding: see :class:`~harness.mllm.base.Decoding`.
        max_response_bytes: the largest response body read; a larger one fails at once.
    """

    backend = "openai_compatible"

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_retries: int = 3, backoff_s: float = 1.0, concurrency: int = 4,
                 decoding: dict[str, Any] | None = None, max_response_bytes: int = 8 * 1024 * 1024) -> None:
        super().__init__(model, decoding)
        if not str(base_url).startswith(("http://", "https://")):
            raise HarnessError(f"mllm.base_url={base_url!r} must start with http:// or https://")
        try:
            httpx.URL(str(base_url))
        except httpx.InvalidURL as e:
            raise HarnessError(f"mllm.base_url={base_url!r} is not a valid URL: {e}") from None
        self.base_url = str(base_url).rstrip("/")
        self.api_key_env = api_key_env
        self.timeout_s, self.max_retries, self.backoff_s = float(timeout_s), int(max_retries), float(backoff_s)
        self.concurrency = max(1, int(concurrency))
        self.max_response_bytes = int(max_response_bytes)
        if not self.timeout_s > 0:
            raise HarnessError(f"mllm.timeout_s={timeout_s!r} must be > 0")
        if self.max_response_bytes < 1:
            raise HarnessError(f"mllm.max_response_bytes={max_response_bytes!r} must be >= 1")

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

    # --- sending -----------------------------------------------------------------------------------

    @property
    def _endpoint(self) -> httpx.URL:
        return httpx.URL(f"{self.base_url}/chat/completions")

    def _client(self) -> httpx.Client:
        """An HTTP client for one :meth:`generate` call: no redirects of its own, no ``.netrc``,
        ``concurrency`` connections kept open."""
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        try:
            transport = _Transport(proxy=_proxy_for(self._endpoint), limits=limits, trust_env=True)
        except (ImportError, ValueError, httpx.InvalidURL) as e:  # e.g. a socks proxy without socksio
            raise MLLMError(f"mllm {self.model}: cannot set up the HTTP client ({type(e).__name__}: {e})") from None
        return httpx.Client(transport=transport, trust_env=False, follow_redirects=False,
                            timeout=httpx.Timeout(self.timeout_s))

    def _key(self) -> str | None:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        key = key.strip() if key else None
        if key and not all(33 <= ord(c) < 127 for c in key):
            raise MLLMError(f"mllm {self.model}: the value of ${self.api_key_env} is not a valid API key "
                            "(it holds spaces, control or non-ASCII characters)")
        return key or None

    def _late(self, received: int | None = None) -> str:
        got = f"; {received} bytes of the body had arrived" if received else ""
        return f"no response within {self.timeout_s:g} s (timeout_s, the whole request{got})"

    def _read(self, resp: httpx.Response, deadline: float, limit: int, cut: bool = False,
              got: list[int] | None = None) -> bytes:
        """The body, against the deadline and ``limit``: a :class:`_Failure` past either, or with
        ``cut`` (an error page), just its first ``limit`` bytes. ``got[0]`` follows the bytes read."""
        declared = resp.headers.get("content-length", "")
        if not cut and declared.strip().isdigit() and int(declared) > limit:
            raise _Failure(f"the response has {int(declared)} bytes, more than max_response_bytes={limit}",
                           retry=False)
        chunks, size = [], 0
        for chunk in resp.iter_raw():
            chunks.append(chunk)
            size += len(chunk)
            if got is not None:
                got[0] = size
            if size > limit:
                if cut:
                    return b"".join(chunks)[:limit]
                raise _Failure(f"the response is larger than max_response_bytes={limit} "
                               f"(stopped after reading {size} bytes)", retry=False)
            if time.monotonic() > deadline:
                raise _Failure(self._late(size), retry=True)
        return b"".join(chunks)

    def _redirect(self, resp: httpx.Response, url: httpx.URL) -> httpx.URL:
        code, loc = resp.status_code, resp.headers.get("location")
        if not loc:
            raise _Failure(f"HTTP {code} {resp.reason_phrase}, a redirect without a Location", retry=False)
        try:
            target = url.join(loc)
        except httpx.InvalidURL:
            raise _Failure(f"HTTP {code}, a redirect to an address that is not a URL", retry=False) from None
        if _origin(target) != _origin(self._endpoint):
            raise _Failure(f"HTTP {code}, a redirect to another origin ({_origin_text(target)}), not followed: the "
                           f"key and the request go to {_origin_text(self._endpoint)} only. If that server is "
                           "the right one, set mllm.base_url to it", retry=False)
        return target

    def _attempt(self, http: httpx.Client, data: bytes, headers: dict[str, str], key: str | None) -> bytes:
        """One try: the response body (the key, should the server echo it, replaced), or a :class:`_Failure`."""
        # the key as it may stand in the body: as is, and JSON-escaped (\" \\ and, from some servers, \/)
        forms = {key, json.dumps(key)[1:-1], json.dumps(key)[1:-1].replace("/", "\\/")} if key else set()

        def scrub(raw: bytes) -> bytes:
            for form in forms:
                raw = raw.replace(form.encode(), b"[redacted]")
            return raw

        deadline = time.monotonic() + self.timeout_s
        _deadline.at = deadline
        got = [0]  # bytes of the body read
        try:
            url = self._endpoint
            for _ in range(MAX_REDIRECTS + 1):
                with http.stream("POST", url, content=data, headers=headers) as resp:
                    code = resp.status_code
                    if code in REDIRECTS:
                        url = self._redirect(resp, url)
                        continue
                    if not 200 <= code < 300:
                        raise _Failure(f"HTTP {code} {resp.reason_phrase}{self._excerpt(resp, deadline, scrub)}",
                                       retry=code == 429 or code >= 500)
                    enc = resp.headers.get("content-encoding", "identity").strip().lower()
                    if enc not in ("", "identity"):
                        raise _Failure(f"the response is {enc}-encoded though the request asked for none",
                                       retry=False)
                    return scrub(self._read(resp, deadline, self.max_response_bytes, got=got))
            raise _Failure(f"more than {MAX_REDIRECTS} redirects", retry=False)
        except httpx.TimeoutException:
            raise _Failure(self._late(got[0]), retry=True) from None
        except httpx.TransportError as e:
            if time.monotonic() > deadline:
                raise _Failure(self._late(got[0]), retry=True) from None
            what = "cannot connect" if isinstance(e, httpx.ConnectError) else "the connection failed"
            raise _Failure(f"{what} ({type(e).__name__}: {e})", retry=True) from None
        finally:
            _deadline.at = None

    def _excerpt(self, resp: httpx.Response, deadline: float, scrub: Any) -> str:
        """``: <what the error page says>``, shortened, or nothing."""
        if resp.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
            return ""
        try:
            raw = scrub(self._read(resp, deadline, 4096, cut=True))
        except (_Failure, httpx.HTTPError):
            return ""
        try:
            out = json.loads(raw)
            text = _server_error(out) if isinstance(out, dict) and "error" in out else ""
        except (ValueError, RecursionError):
            text = ""
        text = text or " ".join(raw.decode("utf-8", "replace").split())
        return f": {text[:200]}{'...' if len(text) > 200 else ''}" if text else ""

    def _post(self, http: httpx.Client, body: dict[str, Any]) -> _Reply:
        key = self._key()
        headers = {"Content-Type": "application/json", "Accept": "application/json", "Accept-Encoding": "identity"}
        if key:
            headers["Authorization"] = f"Bearer {key}"

        def scrub(text: str) -> str:
            return text.replace(key, "[redacted]") if key else text

        data = json.dumps(body).encode()
        if key:
            _scrub_keys.add(key)
        try:
            return self._tries(http, data, headers, key, scrub)
        finally:
            if key:
                _scrub_keys.remove(key)

    def _tries(self, http: httpx.Client, data: bytes, headers: dict[str, str], key: str | None, scrub: Any) -> _Reply:
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                reply = _parse(self._attempt(http, data, headers, key))
                reply.choices = [(scrub(text), finish) for text, finish in reply.choices]
                return reply
            except _Failure as f:
                last = scrub(f.message)
                if not f.retry:
                    break
            log.warning("mllm %s at %s: %s (try %d of %d)", self.model, scrub(self.base_url), last, attempt + 1,
                        self.max_retries + 1)
        raise MLLMError(scrub(f"mllm {self.model} at {self.base_url} gave no answer: {last}"))

    def _one(self, http: httpx.Client, req: Request) -> list[Answer]:
        answers: list[Answer] = []
        while len(answers) < self.decoding.num_samples:
            t0 = time.perf_counter()
            out = self._post(http, self.body(req, self.decoding.num_samples - len(answers)))
            latency = time.perf_counter() - t0
            for text, finish in out.choices:
                answers.append(Answer(text, latency / len(out.choices), out.prompt_tokens, out.completion_tokens,
                                      finish))
        return answers[: self.decoding.num_samples]

    def generate(self, requests: list[Request]) -> list[list[Answer]]:
        if not requests:
            return []
        with self._client() as http, ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda r: self._one(http, r), requests))
