"""The gateway's bounds on what a client may send and hold, over real sockets (api/http_server.py,
api/request_checks.py): invalid Unicode anywhere, tokenization off the event loop with bounded
concurrency, the connection cap, read timeouts, an SSE client that stops reading, and what
/v1/models and /health reveal. Bounds on time are derived from the configured timeouts, with
slack; no assertion depends on CPU speed."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.text.tokenizer import ModelTokenizer
from tests.integration.controlplane.conftest import (
    SERVED_MODEL_NAME,
    LoopThread,
    Stack,
    start_stack,
    stop_stack,
)
from tests.integration.controlplane.scripted_worker import Script

M = SERVED_MODEL_NAME
JSON = {"Content-Type": "application/json"}


def _address(stack: Stack) -> tuple[str, int]:
    url = urllib.parse.urlsplit(stack.url)
    return url.hostname or "", url.port or 0


def _request(
    stack: Stack, method: str, path: str, body: bytes | None = None, timeout_s: float = 30
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*_address(stack), timeout=timeout_s)
    try:
        conn.request(method, path, body, JSON if body is not None else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _metric(stack: Stack, name: str) -> float:
    value = stack.server.metrics.registry.get_sample_value(f"strata_gateway_{name}")
    return 0.0 if value is None else value


def _in_flight(stack: Stack) -> tuple[int, float]:
    """(requests the registry counts on its instances, the requests_in_flight gauge)."""

    async def read() -> int:  # on the gateway's own loop
        return sum(info.in_flight for info in stack.server.registry.list_instances())

    return stack.loop.run(read()), _metric(stack, "requests_in_flight")


def _wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:g} s"
        time.sleep(0.02)


# -- invalid Unicode --------------------------------------------------------------------------

SURROGATE = "\\ud800"  # as JSON spells it: a lone high surrogate
UNICODE_CASES = [
    ("chat-content", "/v1/chat/completions",
     '{"model": "%s", "messages": [{"role": "user", "content": "a%sb"}]}', "messages[0]"),
    ("chat-content-part", "/v1/chat/completions",
     '{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "%s"}]}]}',
     "messages[0]"),
    ("chat-name", "/v1/chat/completions",
     '{"model": "%s", "messages": [{"role": "user", "content": "x", "name": "%s"}]}',
     "messages[0]"),
    ("prompt", "/v1/completions", '{"model": "%s", "prompt": "%s"}', "prompt"),
    ("stop", "/v1/completions", '{"model": "%s", "prompt": "x", "stop": ["%s"]}', "stop"),
    ("cache-salt", "/v1/completions", '{"model": "%s", "prompt": "x", "cache_salt": "%s"}',
     "cache_salt"),
    ("user", "/v1/chat/completions",
     '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "user": "%s"}', "user"),
    ("metadata", "/v1/chat/completions",
     '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "metadata": {"k": "%s"}}',
     "metadata"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "template", "param"), [pytest.param(*c[1:], id=c[0]) for c in UNICODE_CASES]
)
def test_lone_surrogate_anywhere_is_400(stack: Stack, path: str, template: str, param: str) -> None:
    status, raw = _request(stack, "POST", path, (template % (M, SURROGATE)).encode())
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        param,
        "invalid_unicode",
    )
    assert stack.prefill.prefill_requests == [] and stack.decode.decode_requests == []
    # A valid escaped pair (what json.dumps sends for an emoji) is served as before.
    ok = (template % (M, "\\ud83d\\ude00")).encode()
    status, raw = _request(stack, "POST", path, ok)
    assert status == 200, raw


# -- what /v1/models and /health reveal -------------------------------------------------------


def test_models_and_health_reveal_no_paths_or_endpoints(stack: Stack, tiny_model_dir: Path) -> None:
    status, raw = _request(stack, "GET", "/v1/models")
    assert status == 200
    (model,) = json.loads(raw)["data"]
    assert set(model) == {"id", "object", "created", "owned_by", "max_model_len"}
    assert model["id"] == M
    status, raw = _request(stack, "GET", "/health")
    assert status == 200
    health = json.loads(raw)
    assert {tuple(sorted(w)) for w in health["workers"]} == {("id", "ready", "role", "state")}
    for text in (raw.decode(), json.dumps(model)):
        assert str(tiny_model_dir) not in text and tiny_model_dir.name not in text
        for worker in (stack.prefill, stack.decode):
            assert str(worker.port) not in text
        assert "127.0.0.1" not in text


def test_health_details_only_when_configured(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> None:
    stack = start_stack(loop_thread, tiny_model_dir, model_tokenizer, http={"health_details": True})
    try:
        status, raw = _request(stack, "GET", "/health")
        assert status == 200
        workers = {w["endpoint"]: w for w in json.loads(raw)["workers"]}
        assert set(workers) == {stack.prefill.endpoint, stack.decode.endpoint}
        assert {tuple(sorted(w)) for w in workers.values()} == {
            ("capacity", "detail", "endpoint", "id", "in_flight", "ready", "role", "state")
        }
    finally:
        stop_stack(stack)


# -- tokenization off the event loop, at most tokenizer_threads at once -----------------------


class GatedTokenizer(ModelTokenizer):
    """The real tokenizer, but a completions prompt is tokenized only once `release` is set;
    records how many tokenize at once."""

    def __init__(self, hf: Any) -> None:
        super().__init__(hf)
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.calls: list[str] = []
        self.active = 0
        self.max_active = 0

    def encode_prompt(self, text: str) -> list[int]:
        with self.lock:
            self.calls.append(text)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            assert self.release.wait(60)
            return super().encode_prompt(text)
        finally:
            with self.lock:
                self.active -= 1


@pytest.fixture
def gated(loop_thread: LoopThread, tiny_model_dir: Path) -> Iterator[tuple[Stack, GatedTokenizer]]:
    from transformers import AutoTokenizer

    tokenizer = GatedTokenizer(AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    stack = start_stack(loop_thread, tiny_model_dir, tokenizer, http={"tokenizer_threads": 2})
    try:
        yield stack, tokenizer
    finally:
        tokenizer.release.set()
        stop_stack(stack)


def test_tokenization_runs_off_the_loop_with_bounded_concurrency(
    gated: tuple[Stack, GatedTokenizer],
) -> None:
    stack, tokenizer = gated
    results: list[tuple[int, bytes]] = []
    body = json.dumps({"model": M, "prompt": "Hello there", "max_tokens": 2}).encode()

    def client() -> None:
        results.append(_request(stack, "POST", "/v1/completions", body))

    clients = [threading.Thread(target=client) for _ in range(5)]
    for client in clients:
        client.start()
    _wait_for(lambda: _metric(stack, "requests_in_flight") == 5, 20, "5 requests in flight")
    _wait_for(lambda: tokenizer.active == 2, 20, "2 prompts tokenizing")
    # Both tokenizer threads are held: the event loop still answers (it would hang if it were
    # the one tokenizing), and a prompt refused by its length never reaches the tokenizer.
    assert _request(stack, "GET", "/health", timeout_s=10)[0] == 200
    long_prompt = json.dumps({"model": M, "prompt": "x" * 40_000}).encode()
    status, raw = _request(stack, "POST", "/v1/completions", long_prompt, timeout_s=10)
    assert status == 400 and "characters long" in json.loads(raw)["error"]["message"]
    time.sleep(0.2)  # the three others are queued, not tokenizing
    assert (tokenizer.active, tokenizer.max_active, len(tokenizer.calls)) == (2, 2, 2)
    tokenizer.release.set()
    for client in clients:
        client.join(30)
    assert [status for status, _ in results] == [200] * 5
    assert tokenizer.max_active == 2 and len(tokenizer.calls) == 5


# -- Expect: 100-continue --------------------------------------------------------------------


def test_expect_continue_refuses_a_large_body_before_it_is_sent(stack: Stack) -> None:
    """The module's stack allows 64 KiB: a client announcing 2 MiB and waiting for 100 Continue
    (as curl does above 1 MiB) gets the 413 at once and sends nothing; a small one is told to
    go on and is served."""
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Expect: 100-continue\r\nContent-Length: {}\r\n\r\n"
    )
    big = socket.create_connection(_address(stack), timeout=10)
    big.sendall(head.format(2 * 1024 * 1024).encode())
    raw = _recv_all(big)  # the answer, then closed
    big.close()
    status_line, _, rest = raw.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413 "), raw
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_too_large"

    body = json.dumps({"model": M, "prompt": "x", "max_tokens": 2}).encode()
    small = socket.create_connection(_address(stack), timeout=10)
    small.sendall(head.format(len(body)).encode())
    assert small.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    small.sendall(body)
    answer = small.recv(65536)
    small.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer


# -- the connection cap -----------------------------------------------------------------------


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_connections_beyond_the_cap_get_503(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> None:
    stack = start_stack(loop_thread, tiny_model_dir, model_tokenizer, http={"max_connections": 2})
    try:
        held = [socket.create_connection(_address(stack), timeout=10) for _ in range(2)]
        _wait_for(lambda: _metric(stack, "http_connections") == 2, 10, "2 connections open")
        extra = socket.create_connection(_address(stack), timeout=10)
        raw = _recv_all(extra)  # answered at once, then closed
        extra.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"\r\nRetry-After: 1\r\n" in head and b"\r\nConnection: close" in head
        error = json.loads(body)["error"]
        assert (error["type"], error["code"]) == ("server_error", "too_many_connections")
        assert _metric(stack, "http_connections_refused_total") == 1
        held.pop().close()
        _wait_for(lambda: _metric(stack, "http_connections") == 1, 10, "a connection closed")
        body_ok = json.dumps({"model": M, "prompt": "x", "max_tokens": 1}).encode()
        assert _request(stack, "POST", "/v1/completions", body_ok)[0] == 200
        for sock in held:
            sock.close()
    finally:
        stop_stack(stack)


# -- read timeouts ----------------------------------------------------------------------------


def test_slow_heads_and_bodies_are_cut_at_the_read_timeout(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> None:
    read_timeout_s = 0.5
    stack = start_stack(
        loop_thread, tiny_model_dir, model_tokenizer, http={"read_timeout_s": read_timeout_s}
    )
    bound_s = 10 * read_timeout_s + 5  # generous: the closes come at the timeout itself
    try:
        silent = socket.create_connection(_address(stack), timeout=bound_s)
        half_head = socket.create_connection(_address(stack), timeout=bound_s)
        half_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        for sock in (silent, half_head):
            assert _recv_all(sock) == b""  # closed by the gateway, no answer
            sock.close()
        slow_body = socket.create_connection(_address(stack), timeout=bound_s)
        slow_body.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"model": '
        )
        raw = _recv_all(slow_body)  # 408, then closed
        slow_body.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), raw
        assert json.loads(body)["error"]["code"] == "request_timeout"
        assert _wait_for_zero_connections(stack, bound_s)
    finally:
        stop_stack(stack)


def _wait_for_zero_connections(stack: Stack, timeout_s: float) -> bool:
    _wait_for(lambda: _metric(stack, "http_connections") == 0, timeout_s, "every connection closed")
    return True


# -- an SSE client that stops reading ---------------------------------------------------------


def test_sse_client_that_stops_reading_is_cancelled_within_the_write_timeout(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> None:
    """A raw client sends a streaming request and never reads. Its receive window closes after a
    few KiB; within the write timeout (plus TCP's probe granularity) the gateway aborts the
    connection, cancels the decode and releases the request's load, long before the stream would
    have ended on its own (6000 tokens at 10 ms each: 60 s)."""
    write_timeout_s = 1.0
    stack = start_stack(
        loop_thread,
        tiny_model_dir,
        model_tokenizer,
        max_model_len=8192,
        http={"write_timeout_s": write_timeout_s},
    )
    try:
        words = stack.encode("Hello world! The quick brown fox jumps over the lazy dog. ")
        stack.set_script(Script(token_ids=words * 600, decode_delay_s=0.01))
        body = json.dumps({"model": M, "prompt": "x", "max_tokens": 6000, "stream": True})
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(_address(stack))
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode())
        )
        _wait_for(lambda: _in_flight(stack) == (1, 1.0), 20, "the stream decoding")
        started = time.monotonic()
        # Zero window after ~50 events; TCP_USER_TIMEOUT fires at the first zero-window probe
        # past the timeout (probes back off from 200 ms): well within 5x the timeout + 5 s.
        bound_s = 5 * write_timeout_s + 5
        _wait_for(lambda: _in_flight(stack) == (0, 0.0), bound_s, "the load released")
        assert time.monotonic() - started < 60  # not the stream's natural end
        # The worker learns of the cancellation a moment after the gateway let go of the load.
        _wait_for(lambda: stack.decode.num_decodes_cancelled == 1, 10, "the decode cancelled")
        assert _metric(stack, "http_connections") == 0
        client.close()
        ok = json.dumps({"model": M, "prompt": "x", "max_tokens": 2}).encode()
        assert _request(stack, "POST", "/v1/completions", ok)[0] == 200
    finally:
        stop_stack(stack)
