"""`megedit serve` under attack and load: every bad request is a 4xx with a one-line message, a row
that fails fails alone, work and connections are bounded (the key checked before the body is read,
body and queue limits, disconnected clients' rows cancelled, half-open connections closed, the Host
header checked on a keyless server). Driven over real sockets against uvicorn in a thread, over the
tiny pack of test_generation."""

import http.client
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from test_generation import edited  # noqa: F401  (the module's tiny pack fixture)

import megedit.serve.batcher as batcher_module
from megedit.serve import create_app, in_thread
from megedit.serve.steps import Cohort

MODEL = "megedit/tiny"
BASE = f"{MODEL}-base"
BIG = 64 * 1024 * 1024  # the body a client claims to send


@contextmanager
def serving(app, **limits):
    """(host, port) of the app on a free loopback port, in a thread."""
    with in_thread(app, **limits) as root:
        host, port = root.removeprefix("http://").rsplit(":", 1)
        yield host, int(port)


@pytest.fixture(scope="module")
def server(edited):  # noqa: F811
    app = create_app(edited, model_id=MODEL)
    with serving(app) as address:
        yield app, address


def call(address, path, body=None, *, raw: str | None = None, headers=None, method="POST"):
    """(status, parsed JSON body, headers) of one request; `raw`: the body text as is."""
    connection = http.client.HTTPConnection(*address, timeout=60)
    data = raw if raw is not None else None if body is None else json.dumps(body)
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    reply = connection.getresponse()
    text = reply.read().decode()
    connection.close()
    return reply.status, json.loads(text) if text.startswith("{") else text, dict(reply.getheaders())


def complete(address, **body):
    return call(address, "/v1/completions", {"model": MODEL, "max_tokens": 6, "temperature": 0, **body})


def chat(address, messages, **body):
    return call(address, "/v1/chat/completions", {"model": MODEL, "max_tokens": 6, "temperature": 0,
                                                  "messages": messages, **body})


def assert_refused(status, body, code=400, says=""):
    """A 4xx in OpenAI's shape with one line that says what is wrong, and no exception text."""
    assert status == code, body
    message = body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "\n" not in message and "Error:" not in message and "Traceback" not in message and says in message


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("body, says", [
    ({"prompt": ""}, "prompt: must not be empty"),
    ({"prompt": ["zzzz", ""]}, "prompt.1: must not be empty"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a"] * 65}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": "zzzz", "max_tokens": True}, "max_tokens"),
    ({"prompt": "zzzz", "max_tokens": 2.0}, "max_tokens"),
    ({"prompt": "zzzz", "stream": "yes"}, "stream"),
    ({"prompt": "zzzz", "temperature": "0.5"}, "temperature"),
    ({"prompt": "zzzz", "seed": 2**64}, "seed"),
    ({"prompt": "zzzz", "seed": -1}, "seed"),
    ({"prompt": "zzzz", "stop": ["a" * 3000]}, "stop: a stop string may be 256 characters long, found 3000"),
    ({"prompt": "zzzz", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "zzzz", "top_p": 0}, "top_p"),
    ({"prompt": "zzzz", "model": 7}, "model"),
])
def test_a_bad_completion_is_a_400_in_one_line(server, body, says):
    assert_refused(*complete(server[1], **body)[:2], says=says)


@pytest.mark.parametrize("raw, says", [
    ('{"model": "megedit/tiny", "prompt": "\\ud800"}', "prompt: not valid Unicode (a lone surrogate at character 0)"),
    ('{"model": "megedit/tiny", "prompt": "zzzz", "temperature": NaN}', "temperature"),
    ('{"model": "megedit/tiny", "prompt": "zzzz", "stop": "\\udfff"}', "stop: not valid Unicode"),
    ("{", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, ""),
    ("", ""),
])
def test_a_body_that_is_not_text_or_json_is_a_400(server, raw, says):
    assert_refused(*call(server[1], "/v1/completions", raw=raw)[:2], says=says)


@pytest.mark.parametrize("messages, says", [
    ([{"role": "wizard", "content": "hi"}], "messages.0.role"),
    ([{"role": "tool", "content": "hi"}], "messages.0.role"),
    ([{"role": "user", "content": None}], "messages.0.content"),
    ([{"role": "user", "content": 5}], "messages.0.content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "messages.0.content"),
    ([{"role": "user"}], "messages.0.content"),
    ([{"role": "user", "content": ""}], "messages.0.content: must not be empty"),
    ([{"role": "user", "content": "\ud800"}], "messages.0.content: not valid Unicode"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "must end with a user message"),
    ([], "messages"),
])
def test_a_bad_chat_is_a_400_in_one_line(server, messages, says):
    assert_refused(*chat(server[1], messages)[:2], says=says)


def test_a_prompt_longer_than_the_servers_limit_is_a_400(edited):  # noqa: F811
    with serving(create_app(edited, model_id=MODEL, max_prompt_tokens=20)) as address:
        assert_refused(*complete(address, prompt="z" * 21)[:2], says="is 21 tokens long; the limit is 20")
        assert complete(address, prompt="z" * 20)[0] == 200


def test_a_tiny_temperature_is_answered_greedily_streamed_or_not(server):
    status, greedy, _ = complete(server[1], prompt="zzzz", max_tokens=10)
    for temperature in (1e-300, 5e-5):
        status, body, _ = complete(server[1], prompt="zzzz", max_tokens=10, temperature=temperature, seed=3)
        assert status == 200 and body["choices"][0]["text"] == greedy["choices"][0]["text"]
    status, text, _ = complete(server[1], prompt="zzzz", max_tokens=10, temperature=1e-300, stream=True)
    chunks = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
    assert status == 200 and "".join(c["choices"][0]["text"] for c in chunks) == greedy["choices"][0]["text"]
    assert "error" not in text


def test_the_largest_seed_is_taken(server):
    status, body, _ = complete(server[1], prompt="zzzz", temperature=1.0, seed=2**64 - 1)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_bad_request_beside_good_ones_leaves_them_answered(server):
    _, alone, _ = complete(server[1], prompt="zzzz")
    bad = '{"model": "megedit/tiny", "prompt": ["zzzz", "\\ud800"]}'
    with ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(complete, server[1], prompt="zzzz") for _ in range(4)]
        bads = [pool.submit(call, server[1], "/v1/completions", raw=bad) for _ in range(2)]
        assert all(f.result()[1]["choices"] == alone["choices"] for f in goods)
        assert all(f.result()[0] == 400 for f in bads)


# -- isolation ----------------------------------------------------------------------------------


@contextmanager
def held(batcher, monkeypatch):
    """The worker waits before admitting rows until the returned event is set, so the rows queued
    meanwhile are admitted (and prefilled) as one batch."""
    gate, join = threading.Event(), batcher._join

    def wait_then_join(cohort, live, rows):
        gate.wait(30)
        return join(cohort, live, rows)

    monkeypatch.setattr(batcher, "_join", wait_then_join)
    try:
        yield gate
    finally:
        gate.set()


def queued_behind_one(batcher, pool, calls):
    """Submit the calls: the first is taken by the (held) worker, the others wait in the queue."""
    before = batcher.stats["requests"]
    first = pool.submit(calls[0][0], *calls[0][1:-1], **calls[0][-1])
    _wait_for(lambda: batcher.stats["requests"] == before + 1 and batcher.waiting == 0)
    return [first, *(pool.submit(f, *args, **kwargs) for f, *args, kwargs in calls[1:])]


def _fail_on(model, marker: int, when=lambda ids: True):
    """Make the model's forward raise for any batch holding token `marker`."""
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and (ids == marker).any() and when(ids):
            raise RuntimeError("secret detail: row made to fail")
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def test_a_row_that_fails_fails_alone_and_its_partners_are_answered(edited, monkeypatch, caplog):  # noqa: F811
    app = create_app(edited, model_id=MODEL)
    marker = edited.tokenizer("~", add_special_tokens=False)["input_ids"][0]
    prompts = ["zzzz", "q1:", "abcabc", "q0:"]
    with serving(app) as address:
        alone = {p: complete(address, prompt=p)[1]["choices"][0]["text"] for p in prompts}
        handle = _fail_on(edited.model, marker)
        try:
            with held(app.state.batcher, monkeypatch) as gate, ThreadPoolExecutor(5) as pool, \
                    caplog.at_level(logging.ERROR):
                calls = [(complete, address, {"prompt": p}) for p in prompts]
                goods = queued_behind_one(app.state.batcher, pool, calls)
                bad = pool.submit(complete, address, prompt="boom~")  # in one prefill with three good rows
                _wait_for(lambda: app.state.batcher.waiting == 4)
                gate.set()
                status, body, headers = bad.result()
                answers = [f.result() for f in goods]
        finally:
            handle.remove()
    assert [a[1]["choices"][0]["text"] for a in answers] == [alone[p] for p in prompts]
    rid = headers["x-request-id"]
    assert status == 500 and body["error"]["message"] == f"internal error (request id {rid})"
    assert "secret detail" in caplog.text and rid in caplog.text  # the detail is in the log, not the answer
    assert app.state.batcher.stats["failed"] == 1


def test_a_decoding_step_that_fails_is_run_again_row_by_row(edited, monkeypatch):  # noqa: F811
    app = create_app(edited, model_id=MODEL)
    failed = []
    step = Cohort.step

    def flaky(self, tokens):  # the third step of a batch of several rows fails, once
        if len(tokens) > 1 and not failed and app.state.batcher.stats["steps"] == 3:
            failed.append(len(tokens))
            raise RuntimeError("a step failed")
        return step(self, tokens)

    prompts = ["zzzz", "q1:", "abcabc", "q0:"]
    with serving(app) as address:
        alone = [complete(address, prompt=p, max_tokens=8)[1]["choices"][0]["text"] for p in prompts]
        app.state.batcher.stats["steps"] = 0
        monkeypatch.setattr(Cohort, "step", flaky)
        with held(app.state.batcher, monkeypatch) as gate, ThreadPoolExecutor(4) as pool:
            futures = queued_behind_one(app.state.batcher, pool,
                                        [(complete, address, {"prompt": p, "max_tokens": 8}) for p in prompts])
            _wait_for(lambda: app.state.batcher.waiting == 3)
            gate.set()
            answers = [f.result() for f in futures]
    assert failed and [a[0] for a in answers] == [200] * 4
    assert [a[1]["choices"][0]["text"] for a in answers] == alone


# -- bounded work -------------------------------------------------------------------------------


def _raw(address, head: str, body: bytes = b"", timeout: float = 10.0) -> bytes:
    """Send a request head and part of a body over a bare socket; what the server answers before
    closing the connection."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _head(address, length: int, key: str | None = None) -> str:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\nContent-Type: application/json\r\n"
            f"{auth}Content-Length: {length}\r\n\r\n")


def test_the_key_is_checked_and_the_size_limited_before_the_body_is_read(edited):  # noqa: F811
    with serving(create_app(edited, model_id=MODEL, api_key="sekret")) as address:
        start = time.monotonic()
        unauthenticated = _raw(address, _head(address, BIG), b"x" * 65536)  # 64 KiB of a claimed 64 MiB
        too_big = _raw(address, _head(address, BIG, "sekret"), b"x" * 65536)
        assert time.monotonic() - start < 10  # answered without waiting for the rest of the body
        assert unauthenticated.startswith(b"HTTP/1.1 401") and b'"invalid_api_key"' in unauthenticated
        assert too_big.startswith(b"HTTP/1.1 413") and b'"body_too_large"' in too_big
        status, body, _ = call(address, "/v1/completions", raw="{")  # unauthenticated and unparseable: 401
        assert status == 401
        status, body, _ = call(address, "/v1/completions", raw="{", headers={"Authorization": "Bearer sekret"})
        assert status == 400


def test_a_chunked_body_over_the_limit_is_a_413(edited):  # noqa: F811
    with serving(create_app(edited, model_id=MODEL, max_body_bytes=1000)) as address:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\nContent-Type: application/json\r\n"
                f"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 600
        answer = _raw(address, head, b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2)
        assert answer.startswith(b"HTTP/1.1 413")
        assert complete(address, prompt="zzzz")[0] == 200


def test_a_body_that_does_not_arrive_in_time_is_a_408(edited):  # noqa: F811
    with serving(create_app(edited, model_id=MODEL, body_timeout_s=1)) as address:
        start = time.monotonic()
        answer = _raw(address, _head(address, 100), b'{"model"')
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 8


def test_the_queue_counts_prompts_and_tokens(edited, monkeypatch):  # noqa: F811
    app = create_app(edited, model_id=MODEL, max_batch=1, max_queue=4, max_queue_tokens=100)
    batcher = app.state.batcher
    with serving(app) as address, held(batcher, monkeypatch) as gate, ThreadPoolExecutor(3) as pool:
        assert_refused(*complete(address, prompt=["zzzz"] * 5)[:2], says="at most 4 prompts")
        assert_refused(*complete(address, prompt=["zzzz"] * 3, max_tokens=30)[:2], says="100 tokens")
        first = pool.submit(complete, address, prompt="zzzz")  # taken by the worker, held at the gate
        _wait_for(lambda: batcher.waiting == 0 and batcher.stats["requests"] == 1)
        three = pool.submit(complete, address, prompt=["zzzz"] * 3)
        _wait_for(lambda: batcher.waiting == 3)
        status, body, headers = complete(address, prompt=["zzzz"] * 2)  # 5 prompts would wait: busy
        assert status == 503 and body["error"]["code"] == "queue_full" and headers["retry-after"] == "1"
        status, body, _ = complete(address, prompt="zzzz", max_tokens=80)  # 1 more prompt, but 84 more tokens
        assert status == 503
        gate.set()
        assert first.result()[0] == 200 and len(three.result()[1]["choices"]) == 3
    assert batcher.waiting == batcher.waiting_tokens == 0


@contextmanager
def endless(monkeypatch, edited, step_s=0.02):  # noqa: F811
    """Every row answers "a" until its max_tokens, a step taking `step_s`: long, predictable rows."""
    token = edited.tokenizer("a", add_special_tokens=False)["input_ids"][0]
    step = Cohort.step

    def slow(self, tokens):
        time.sleep(step_s)
        return step(self, tokens)

    monkeypatch.setattr(batcher_module, "pick", lambda logits, sampling: token)
    monkeypatch.setattr(Cohort, "step", slow)
    yield


def test_the_batch_counts_rows_and_the_tokens_they_can_grow_to(edited, monkeypatch):  # noqa: F811
    app = create_app(edited, model_id=MODEL, max_batch=8, max_batch_tokens=350)
    batcher = app.state.batcher
    with serving(app) as address, endless(monkeypatch, edited, step_s=0.01):
        status, body, _ = complete(address, prompt=["zzzz"] * 6, max_tokens=100)  # about 105 tokens a row: 3 fit
    assert status == 200 and len(body["choices"]) == 6
    assert batcher.stats["largest_batch"] == 3


def test_a_client_that_goes_away_has_its_rows_cancelled(edited, monkeypatch):  # noqa: F811
    app = create_app(edited, model_id=MODEL, max_batch=2)
    batcher = app.state.batcher
    with serving(app) as address, endless(monkeypatch, edited):
        body = json.dumps({"model": MODEL, "prompt": ["zzzz"] * 6, "max_tokens": 100, "temperature": 0})
        with socket.create_connection(address) as sock:  # 6 rows, 2 decoding, 4 waiting; then the client leaves
            sock.sendall((_head(address, len(body)) + body).encode())
            _wait_for(lambda: batcher.active == 2 and batcher.waiting == 4)
        _wait_for(lambda: batcher.active == 0 and batcher.waiting == 0, timeout=5)
        assert batcher.stats["cancelled"] == 6 and batcher.stats["steps"] < 100
        connection = http.client.HTTPConnection(*address, timeout=30)  # a stream the client stops reading
        connection.request("POST", "/v1/completions", json.dumps(
            {"model": MODEL, "prompt": "zzzz", "max_tokens": 100, "temperature": 0, "stream": True}),
            {"Content-Type": "application/json"})
        reply = connection.getresponse()
        assert reply.status == 200 and reply.read(6) == b"data: "
        _wait_for(lambda: batcher.active == 1)
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        _wait_for(lambda: batcher.active == 0 and batcher.stats["cancelled"] == 7, timeout=1.5)  # 100 steps: 2 s


# -- connections --------------------------------------------------------------------------------


def test_fifty_half_open_connections_are_closed_by_the_server(edited):  # noqa: F811
    with serving(create_app(edited, model_id=MODEL), header_timeout_s=2) as address:
        sockets = [socket.create_connection(address, timeout=30) for _ in range(50)]
        start = time.monotonic()
        for i, sock in enumerate(sockets):
            if i % 2:  # half send part of a request's headers, half nothing at all
                sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{address[1]}\r\n".encode())
        for sock in sockets:
            assert sock.recv(1024) == b""  # closed by the server
            sock.close()
        assert time.monotonic() - start < 30
        assert complete(address, prompt="zzzz")[0] == 200


def test_connections_beyond_the_limit_are_refused(edited):  # noqa: F811
    with serving(create_app(edited, model_id=MODEL), max_connections=4, header_timeout_s=30) as address:
        idle = [socket.create_connection(address) for _ in range(4)]
        time.sleep(0.2)
        status, text, _ = call(address, "/healthz", method="GET")
        for sock in idle:
            sock.close()
        assert status == 503
        time.sleep(0.2)
        assert call(address, "/healthz", method="GET")[0] == 200


@pytest.mark.parametrize("host, ok", [
    ("127.0.0.1:{port}", True), ("localhost:{port}", True), ("LOCALHOST", True), ("[::1]:{port}", True),
    ("localhost:9999", True),  # a tunnel may change the port; DNS rebinding cannot change the name
    ("evil.example:{port}", False), ("127.0.0.1.evil.example:{port}", False), ("localhost.evil:{port}", False),
    ("", False), ("localhost:x", False),
])
def test_a_server_without_a_key_answers_only_to_a_loopback_host(server, host, ok):
    status, body, _ = call(server[1], "/healthz", method="GET", headers={"Host": host.format(port=server[1][1])})
    if ok:
        assert status == 200
    else:
        assert_refused(status, body, says="the Host header must name the loopback")


def test_a_server_with_a_key_takes_any_host(edited):  # noqa: F811
    with serving(create_app(edited, model_id=MODEL, api_key="sekret")) as address:
        status, _, _ = call(address, "/v1/models", method="GET",
                            headers={"Host": "my-server.lan:8000", "Authorization": "Bearer sekret"})
        assert status == 200


def test_every_answer_carries_a_request_id(server):
    ids = {complete(server[1], prompt="zzzz")[2]["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 16 for i in ids)


def _wait_for(condition, timeout=20.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)
