"""The chat-completions client against a small server on 127.0.0.1 that speaks the protocol and
can be told to answer, fail with 500, hang past the timeout or return malformed JSON."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from conftest import run_harness
from harness.mllm.base import Request
from harness.mllm.openai_compatible import MLLMError, OpenAICompatible

SECRET = "sk-test-0123456789abcdef-do-not-log"


class Server:
    """Answers ``POST /v1/chat/completions`` following ``script`` (one mode per request, then
    ``ok``): ``ok``, ``500``, ``401``, ``hang`` (sleeps 2 s), ``malformed``."""

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
                if mode in ("500", "401"):
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
