"""The chat-completions client against small servers on 127.0.0.1 that speak the protocol and
can be told to answer, fail with an HTTP status, hang past the timeout, return malformed JSON,
redirect, send slowly or send too much."""

import json
import logging
import re
import threading
import time
import tracemalloc
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from conftest import run_harness
from harness.mllm.base import Request
from harness.mllm.openai_compatible import MAX_REDIRECTS, REDIRECTS, MLLMError, OpenAICompatible
from harness.types import HarnessError

SECRET = "sk-test-0123456789abcdef-do-not-log"


class Server:
    """Answers ``POST /v1/chat/completions`` following ``script`` (one mode per request, then
    ``ok``): ``ok``, an HTTP status (``500``, ``401`` ...), ``hang`` (sleeps 2 s), ``malformed``."""

    def __init__(self) -> None:
        self.script: list[str] = []
        self.seen: list[dict] = []
        self.reply = lambda body, i: f"answer {i}: the ears"  # the content of choice i
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                mode = outer.script.pop(0) if outer.script else "ok"
                if mode == "hang":
                    time.sleep(2)
                if mode.isdigit():
                    self.send_response(int(mode))
                    self.end_headers()
                    return
                text = "not json at all" if mode == "malformed" else json.dumps({
                    "id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": i, "message": {"role": "assistant", "content": outer.reply(body, i)},
                                 "finish_reason": "stop"} for i in range(body.get("n", 1))],
                    "usage": {"prompt_tokens": 42, "completion_tokens": 5 * body.get("n", 1)}})
                data = text.encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def req():
    return Request([Image.new("RGB", (8, 8), "red")], "Why is this a cat?", system="Be brief.")


def client(server, **kw):
    return OpenAICompatible(server.url, "llava-test", **{"timeout_s": 0.5, "max_retries": 2, "backoff_s": 0.01, **kw})


def test_answers_and_the_request_follows_the_protocol(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    (answers,) = client(server).generate([req()])
    assert answers[0].text == "answer 0: the ears" and answers[0].prompt_tokens == 42 and answers[0].finish_reason == "stop"
    sent = server.seen[0]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == f"Bearer {SECRET}"
    body = sent["body"]
    assert body["model"] == "llava-test" and body["temperature"] == 0.0 and body["n"] == 1
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    user = body["messages"][1]["content"]
    assert user[0] == {"type": "text", "text": "Why is this a cat?"}
    assert user[1]["image_url"]["url"].startswith("data:image/png;base64,")
    sampled = client(server, decoding={"do_sample": True, "temperature": 0.7, "num_samples": 3}).generate([req()])
    assert [a.text for a in sampled[0]] == [f"answer {i}: the ears" for i in range(3)]
    assert server.seen[-1]["body"]["temperature"] == 0.7 and server.seen[-1]["body"]["n"] == 3


def test_retries_500_then_succeeds_and_gives_up_with_a_clear_error(server):
    server.script = ["500", "500"]
    assert client(server).generate([req()])[0][0].text.startswith("answer 0")
    assert len(server.seen) == 3
    server.script = ["500"] * 3
    with pytest.raises(MLLMError, match=r"gave no answer: HTTP 500"):
        client(server).generate([req()])


def test_timeout_malformed_and_client_errors(server):
    server.script = ["hang", "hang", "hang"]
    t0 = time.perf_counter()
    with pytest.raises(MLLMError, match=r"no response within 0.5 s"):
        client(server).generate([req()])
    assert time.perf_counter() - t0 < 5
    server.script = ["malformed", "ok"]
    assert client(server).generate([req()])[0][0].text.startswith("answer 0")  # retried
    server.script = ["malformed"] * 3
    with pytest.raises(MLLMError, match="not chat-completions JSON"):
        client(server).generate([req()])
    n = len(server.seen)
    server.script = ["401"]
    with pytest.raises(MLLMError, match="HTTP 401"):
        client(server).generate([req()])
    assert len(server.seen) == n + 1  # a client error is not retried
    with pytest.raises(MLLMError, match="cannot connect"):
        OpenAICompatible("http://127.0.0.1:9/v1", "m", max_retries=0).generate([req()])


def test_concurrent_requests_keep_their_order(server):
    reqs = [Request([Image.new("RGB", (4, 4))], f"q{i}") for i in range(6)]
    out = client(server, concurrency=3).generate(reqs)
    assert len(out) == 6 and len(server.seen) == 6
    asked = sorted(s["body"]["messages"][0]["content"][0]["text"] for s in server.seen)
    assert asked == [f"q{i}" for i in range(6)]


def test_the_key_never_reaches_the_store(server, tmp_path, cache_dir, trained_vit):
    r = run_harness("xai=saliency", "dataset.n=2", "metrics=[srg]", "mllm=openai_compatible",
                    f"mllm.base_url={server.url}", "mllm.model=llava-test", "mllm.api_key_env=HARNESS_TEST_KEY",
                    f"paths.cache_dir={cache_dir}", f"language.cache_dir={tmp_path}/answers",
                    f"tracking.uri=sqlite:///{tmp_path}/m.db", f"tracking.artifact_location={tmp_path}/a",
                    f"hydra.run.dir={tmp_path}/run", env={"HARNESS_TEST_KEY": SECRET})
    assert r.returncode == 0, r.stderr[-3000:]
    assert server.seen and all(s["auth"] == f"Bearer {SECRET}" for s in server.seen)
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked and SECRET not in r.stdout + r.stderr
    texts = [json.loads(line)["text"] for p in (tmp_path / "a").rglob("answers.jsonl") for line in p.read_text().splitlines()]
    assert texts == ["answer 0: the ears"] * 2
    np.testing.assert_array_equal([len(texts)], [2])


# --- redirects, deadlines, sizes, schemas, the key ----------------------------------------------


def completion(n=1, content="the ears", **extra):
    """A chat-completions body (``extra`` replaces top-level keys)."""
    return json.dumps({"id": "x", "object": "chat.completion", "model": "llava-test",
                       "choices": [{"index": i, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"} for i in range(n)],
                       "usage": {"prompt_tokens": 42, "completion_tokens": 5}, **extra}).encode()


class Loopback:
    """A server on 127.0.0.1 that answers every request (any method) with ``handle(handler)`` and
    lists each as ``(method, path, Authorization header, body)`` in ``seen``."""

    def __init__(self, handle) -> None:
        self.seen: list[tuple] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def any(self):
                n = int(self.headers.get("Content-Length") or 0)
                self.body = self.rfile.read(n) if n else b""
                outer.seen.append((self.command, self.path, self.headers.get("Authorization"), self.body))
                try:
                    handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up

            do_GET = do_POST = do_PUT = any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.origin}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def send(h, code=200, body=b"", headers=(), length=True):
    h.send_response(code)
    for k, v in dict(headers).items():
        h.send_header(k, v)
    if length:
        h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@pytest.fixture
def loopback():
    servers = []

    def start(handle):
        servers.append(Loopback(handle))
        return servers[-1]

    yield start
    for s in servers:
        s.httpd.shutdown()
        s.httpd.server_close()


@pytest.mark.parametrize("code", REDIRECTS)
def test_a_redirect_to_another_port_is_refused_and_the_key_never_gets_there(loopback, monkeypatch, code):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    other = loopback(lambda h: send(h, 200, completion()))
    first = loopback(lambda h: send(h, code, headers={"Location": f"{other.url}/chat/completions"}))
    with pytest.raises(MLLMError, match=f"HTTP {code}, a redirect to another origin") as e:
        client(first, max_retries=3).generate([req()])
    assert other.seen == []  # nothing at all reached it, the key least of all
    assert [s[:3] for s in first.seen] == [("POST", "/v1/chat/completions", f"Bearer {SECRET}")]  # not retried
    assert f"http://127.0.0.1:{other.port}" in str(e.value) and "set mllm.base_url" in str(e.value)


@pytest.mark.parametrize("target", ["http://localhost:{port}/v1/chat/completions",
                                    "https://127.0.0.1:{port}/v1/chat/completions",
                                    "//localhost:{port}/v1/chat/completions"])
def test_another_host_name_or_scheme_is_another_origin(loopback, monkeypatch, target):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    s = loopback(lambda h: send(h, 307, headers={"Location": target.format(port=h.server.server_address[1])}))
    with pytest.raises(MLLMError, match="another origin"):
        client(s).generate([req()])
    assert len(s.seen) == 1


@pytest.mark.parametrize("code", REDIRECTS)
@pytest.mark.parametrize("absolute", [False, True])
def test_a_same_origin_redirect_is_followed_with_the_post_and_the_key(loopback, monkeypatch, code, absolute):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)

    def handle(h):
        if h.path == "/v1/chat/completions":
            where = "/v2/chat/completions"
            send(h, code, headers={"Location": f"http://127.0.0.1:{h.server.server_address[1]}{where}"
                                   if absolute else where})
        else:
            send(h, 200, completion(content=f"moved to {h.path}"))

    s = loopback(handle)
    (answers,) = client(s).generate([req()])
    assert answers[0].text == "moved to /v2/chat/completions"
    assert [x[:3] for x in s.seen] == [("POST", "/v1/chat/completions", f"Bearer {SECRET}"),
                                       ("POST", "/v2/chat/completions", f"Bearer {SECRET}")]
    assert s.seen[0][3] == s.seen[1][3] and json.loads(s.seen[1][3])["model"] == "llava-test"


def test_a_redirect_loop_ends_after_the_limit(loopback):
    s = loopback(lambda h: send(h, 302, headers={"Location": "/v1/chat/completions"}))
    with pytest.raises(MLLMError, match=f"more than {MAX_REDIRECTS} redirects"):
        client(s).generate([req()])
    assert len(s.seen) == MAX_REDIRECTS + 1  # and not retried
    s2 = loopback(lambda h: send(h, 302))
    with pytest.raises(MLLMError, match="a redirect without a Location"):
        client(s2).generate([req()])


def drip_body(h):
    """Headers at once, then the body one byte a second."""
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", "1000")
    h.end_headers()
    for c in completion().ljust(1000):
        h.wfile.write(bytes([c]))
        h.wfile.flush()
        time.sleep(1.0)


def drip_head(h):
    """The status line and headers a byte every 0.3 s: each read is quick, the request is not."""
    for c in b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"x" * 1000:
        h.wfile.write(bytes([c]))
        h.wfile.flush()
        time.sleep(0.3)


def test_timeout_s_is_a_deadline_for_a_slow_drip(loopback):
    s = loopback(drip_body)
    t0 = time.monotonic()
    with pytest.raises(MLLMError, match=r"no response within 2 s \(timeout_s, the whole request; \d+ bytes"):
        client(s, timeout_s=2, max_retries=0).generate([req()])
    took = time.monotonic() - t0
    assert 1.9 < took < 3.0, took
    s = loopback(drip_head)
    t0 = time.monotonic()
    with pytest.raises(MLLMError, match=r"no response within 1 s"):
        client(s, timeout_s=1, max_retries=1).generate([req()])
    took = time.monotonic() - t0
    assert len(s.seen) == 2 and 1.9 < took < 3.0, took  # two tries of 1 s each


HUGE = 20 * 2**20


def huge(h, declare):
    """20 MiB of JSON whitespace, with a Content-Length or without (read to the end)."""
    chunk = b" " * 2**16
    send(h, 200, headers={"Content-Length": str(HUGE)} if declare else {}, length=False)
    for _ in range(HUGE // len(chunk)):
        h.wfile.write(chunk)


@pytest.mark.parametrize("declare", [False, True], ids=["streamed", "content-length"])
def test_a_huge_body_stops_at_max_response_bytes(loopback, declare):
    s = loopback(lambda h: huge(h, declare))
    limit = 2**20
    c = client(s, timeout_s=10, max_response_bytes=limit)
    r = req()
    c.body(r, 1)  # the PNG encoder's first use is not the client's memory
    tracemalloc.start()
    try:
        with pytest.raises(MLLMError, match=f"max_response_bytes={limit}") as e:
            c.generate([r])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(s.seen) == 1  # not retried
    assert peak < 2 * limit, peak  # the body is 20 times the limit
    if declare:
        assert f"the response has {HUGE} bytes" in str(e.value)
    else:
        read = int(str(e.value).split("stopped after reading ")[1].split()[0])
        assert limit < read <= limit + 2**16, read


def test_the_size_limit_leaves_ordinary_answers_alone(loopback):
    body = completion()
    s = loopback(lambda h: send(h, 200, body, length=False))  # read to the end of the connection
    assert client(s, max_response_bytes=len(body)).generate([req()])[0][0].text == "the ears"
    with pytest.raises(MLLMError, match=f"max_response_bytes={len(body) - 1}"):
        client(s, max_response_bytes=len(body) - 1).generate([req()])
    gz = loopback(lambda h: send(h, 200, b"\x1f\x8b", headers={"Content-Encoding": "gzip"}))
    with pytest.raises(MLLMError, match="gzip-encoded"):
        client(gz).generate([req()])
    assert gz.seen and len(gz.seen) == 1
    with pytest.raises(HarnessError, match="max_response_bytes"):
        OpenAICompatible("http://127.0.0.1:8000/v1", "m", max_response_bytes=0)


def usage(**u):
    return json.dumps({"choices": [{"message": {"content": "a"}, "finish_reason": "stop"}], "usage": u})


SCHEMAS = [  # (body, what the error names)
    ("not json at all", "not JSON: b'not json at all'"),
    ("", "not JSON: b''"),
    ("\udcff", "not JSON"),
    ("[" * 100_000, "not JSON"),
    ("[1, 2]", "the body is an array, not an object"),
    ('"hello"', "the body is a string"),
    ('{"error": {"message": "model overloaded"}}', "no choices, the server reports an error: model overloaded"),
    ('{"id": "x"}', r"no 'choices' \(keys: id\)"),
    ('{"choices": "lots"}', r"choices is a string \('lots'\), not an array"),
    ('{"choices": null}', "choices is null, not an array"),
    ('{"choices": []}', "choices is empty"),
    ('{"choices": [7]}', r"choices\[0\] is a number \(7\), not an object"),
    ('{"choices": [{"finish_reason": "stop"}]}', r"choices\[0\] has no 'message'"),
    ('{"choices": [{"message": "hi"}]}', r"choices\[0\].message is a string \('hi'\), not an object"),
    ('{"choices": [{"message": {"content": 42}}]}', r"choices\[0\].message.content is a number \(42\)"),
    ('{"choices": [{"message": {"content": "a"}}, {"message": {"content": ["b"]}}]}',
     r"choices\[1\].message.content is an array, not a string"),
    ('{"choices": [{"message": {"content": "a"}, "finish_reason": 7}]}', r"choices\[0\].finish_reason is a number"),
    ('{"choices": [{"message": {"content": "a"}}], "usage": "lots"}', r"usage is a string \('lots'\), not an object"),
    ('{"choices": [{"message": {"content": "a"}}], "usage": [1]}', "usage is an array"),
    (usage(prompt_tokens="42"), r"usage.prompt_tokens is a string \('42'\), not a non-negative integer"),
    (usage(prompt_tokens=42, completion_tokens=1.5), r"usage.completion_tokens is a number \(1.5\)"),
    (usage(completion_tokens=True), r"usage.completion_tokens is a boolean \(True\)"),
    (usage(prompt_tokens=-1), r"usage.prompt_tokens is a number \(-1\), not a non-negative integer"),
    (usage(prompt_tokens={"n": 1}), "usage.prompt_tokens is an object"),
]


@pytest.mark.parametrize(("body", "what"), SCHEMAS, ids=[w[:40] for _, w in SCHEMAS])
def test_each_schema_deviation_is_one_clear_error(loopback, body, what):
    raw = body.encode("utf-8", "surrogateescape")
    s = loopback(lambda h: send(h, 200, raw, {"Content-Type": "application/json"}))
    with pytest.raises(MLLMError) as e:  # any other exception type fails the test
        client(s, max_retries=1).generate([req()])
    msg = str(e.value)
    assert msg.startswith(f"mllm llava-test at {s.url} gave no answer: a response that is not chat-completions JSON: ")
    assert re.search(what, msg), msg
    assert len(s.seen) == 2  # a malformed body is retried
    assert len(msg) < 400


def test_what_the_protocol_allows_is_accepted(loopback):
    bodies = iter([b'{"choices": [{"message": {"content": null}}]}',
                   b'{"choices": [{"message": {"role": "assistant", "content": "hi", "refusal": null},'
                   b' "finish_reason": null, "logprobs": null}], "usage": null, "system_fingerprint": "fp"}',
                   b'{"choices": [{"message": {"content": "x"}, "finish_reason": "length"}],'
                   b' "usage": {"prompt_tokens": 3, "total_tokens": 9}}'])
    s = loopback(lambda h: send(h, 200, next(bodies)))
    c = client(s, concurrency=1)
    out = c.generate([req(), req(), req()])
    got = [(a.text, a.prompt_tokens, a.completion_tokens, a.finish_reason) for (a,) in out]
    assert got == [("", None, None, None), ("hi", None, None, None), ("x", 3, None, "length")]


@pytest.mark.parametrize(("status", "tries"), [(429, 3), (502, 3), (503, 3), (400, 1), (403, 1), (404, 1), (300, 1)])
def test_which_statuses_are_retried(server, status, tries):
    server.script = [str(status)] * 3
    with pytest.raises(MLLMError, match=f"gave no answer: HTTP {status}"):
        client(server).generate([req()])
    assert len(server.seen) == tries


def echo_auth(code, template="{auth}"):
    """Answer ``code`` with a body that quotes the request's Authorization header."""
    def handle(h):
        send(h, code, template.format(auth=h.headers.get("Authorization")).encode())
    return handle


KEY_SCENARIOS = {
    "500 quoting the key": (echo_auth(500), "HTTP 500"),
    "400 JSON error quoting the key": (echo_auth(400, '{{"error": {{"message": "bad key {auth}"}}}}'), "bad key"),
    "401": (lambda h: send(h, 401), "HTTP 401"),
    "429": (lambda h: send(h, 429), "HTTP 429"),
    "not JSON quoting the key": (echo_auth(200, "echo: {auth}"), "not JSON"),
    "usage is the key": (echo_auth(200, '{{"choices": [{{"message": {{"content": "a"}}}}], "usage": "{auth}"}}'),
                         "usage is a string"),
    "content is a list holding the key": (
        echo_auth(200, '{{"choices": [{{"message": {{"content": ["{auth}"]}}}}]}}'), "content is an array"),
    "hang": (lambda h: time.sleep(1.0), "no response within"),
    "drip": (drip_body, "no response within"),
    "cross-origin redirect": (lambda h: send(h, 308, headers={"Location": "http://localhost:9/v1?q=1"}),
                              "another origin"),
    "too large": (lambda h: send(h, 200, b" " * 5000), "max_response_bytes"),
    "cannot connect": (None, "cannot connect"),
    "the key in the status line and a header": (
        lambda h: (h.send_response(503, f"Busy {h.headers['Authorization']}"),
                   h.send_header("X-Echo", h.headers["Authorization"]), h.end_headers()), "HTTP 503 Busy Bearer"),
}


@pytest.mark.parametrize("scenario", KEY_SCENARIOS)
def test_the_key_is_in_no_error_and_no_log_line(loopback, monkeypatch, caplog, scenario):
    handle, what = KEY_SCENARIOS[scenario]
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log too
    url = loopback(handle).url if handle else "http://127.0.0.1:9/v1"
    c = OpenAICompatible(url, "llava-test", timeout_s=0.5, max_retries=1, backoff_s=0.01, max_response_bytes=4096)
    with pytest.raises(MLLMError, match=what) as e:
        c.generate([req()])
    told = str(e.value) + "".join(traceback.format_exception(e.value)) + caplog.text
    assert SECRET not in told and SECRET[8:24] not in told
    assert caplog.records and SECRET not in json.dumps(vars(c), default=str)


def test_a_key_the_server_echoes_in_an_answer_is_not_kept(loopback, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    s = loopback(echo_auth(200, '{{"choices": [{{"message": {{"content": "you sent {auth}"}}}}]}}'))
    assert client(s).generate([req()])[0][0].text == "you sent Bearer [redacted]"
    key = "sk-with/slash+and=base64/chars"
    monkeypatch.setenv("OPENAI_API_KEY", key)

    def escaped(usage):  # the key echoed with "/" written "\/", as some servers do
        def handle(h):
            auth = h.headers["Authorization"]
            body = {"choices": [{"message": {"content": auth}}], **({"usage": auth} if usage else {})}
            send(h, 200, json.dumps(body).replace("/", "\\/").encode())
        return handle

    assert client(loopback(escaped(False))).generate([req()])[0][0].text == "Bearer [redacted]"
    with pytest.raises(MLLMError, match="usage is a string") as e:
        client(loopback(escaped(True))).generate([req()])
    assert key not in str(e.value) and "slash" not in str(e.value)


def test_responses_are_asked_uncompressed(loopback):
    s = loopback(lambda h: send(h, 200, completion(content=h.headers.get("Accept-Encoding"))))
    assert client(s).generate([req()])[0][0].text == "identity"


def test_a_key_that_cannot_be_a_header_is_refused_without_showing_it(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-with\nnewline-secret")
    with pytest.raises(MLLMError, match=r"value of \$OPENAI_API_KEY is not a valid API key") as e:
        client(server).generate([req()])
    assert "newline-secret" not in str(e.value) and server.seen == []
    monkeypatch.setenv("OPENAI_API_KEY", f"  {SECRET}\n")  # surrounding whitespace is dropped
    client(server).generate([req()])
    assert server.seen[-1]["auth"] == f"Bearer {SECRET}"


def test_the_constructor_stays_compatible(server):
    c = OpenAICompatible(server.url, "m", "NO_SUCH_KEY_VAR", 5.0, 1, 0.5, 2, {"max_new_tokens": 7})
    assert (c.timeout_s, c.max_retries, c.backoff_s, c.concurrency, c.max_response_bytes) == (5.0, 1, 0.5, 2, 8 * 2**20)
    assert c.identity() == {"backend": "openai_compatible", "model": "m", "decoding": c.decoding.as_dict(),
                            "base_url": server.url}  # the cache key of stored answers is unchanged
    assert c.generate([]) == [] and c.generate([req()])[0][0].text.startswith("answer 0")
    assert server.seen[-1]["auth"] is None and server.seen[-1]["body"]["max_tokens"] == 7


def test_the_proxy_named_by_the_environment_is_used_unless_no_proxy_says_otherwise(loopback, monkeypatch):
    proxy = loopback(lambda h: send(h, 200, completion(content=f"via the proxy: {h.path}")))
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                 "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", proxy.origin)
    answer = OpenAICompatible("http://llm.invalid:8000/v1", "m", max_retries=0).generate([req()])[0][0]
    assert answer.text == "via the proxy: http://llm.invalid:8000/v1/chat/completions"
    monkeypatch.setenv("no_proxy", "llm.invalid")
    with pytest.raises(MLLMError, match="cannot connect"):
        OpenAICompatible("http://llm.invalid:8000/v1", "m", max_retries=0).generate([req()])


def test_this_httpx_lets_the_deadline_reach_every_socket_operation():
    from harness.mllm.openai_compatible import _Transport

    assert _Transport().deadline_installed and _Transport(proxy="http://127.0.0.1:9").deadline_installed
