"""Bad requests over raw HTTP get OpenAI error JSON with the right 4xx, and the server keeps going;
unreachable workers give a clean 503."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from controlplane.instances.types import InstanceState
from controlplane.text.tokenizer import ModelTokenizer
from tests.integration.controlplane.conftest import (
    MAX_MODEL_LEN,
    SERVED_MODEL_NAME,
    LoopThread,
    Stack,
    start_stack,
    stop_stack,
)

M = SERVED_MODEL_NAME
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
JSON = {"Content-Type": "application/json"}
F = {"name": "f"}
USER = [{"role": "user", "content": "Hi"}]
LONG_PROMPT = "seven " * (MAX_MODEL_LEN + 10)


def _request(
    stack: Stack, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    url = urllib.parse.urlsplit(stack.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        conn.request(method, path, body, headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# (id, method, path, raw body, headers, status, param, code)
BAD_REQUESTS = [
    ("invalid-json", "POST", CHAT, b"{not json", JSON, 400, None, "invalid_json"),
    ("empty-body", "POST", COMPLETIONS, b"", JSON, 400, None, "invalid_json"),
    ("deeply-nested", "POST", CHAT, b"[" * 10_000, JSON, 400, None, "invalid_json"),
    ("body-is-a-list", "POST", CHAT, _json([1, 2]), JSON, 400, None, "invalid_body"),
    ("missing-model", "POST", CHAT, _json({"messages": USER}), JSON, 400, "model",
     "missing_required_parameter"),
    ("unknown-model", "POST", CHAT, _json({"model": "gpt-9", "messages": USER}), JSON, 404,
     "model", "model_not_found"),
    ("model-not-a-string", "POST", COMPLETIONS, _json({"model": 3, "prompt": "x"}), JSON, 400,
     "model", None),
    ("missing-messages", "POST", CHAT, _json({"model": M}), JSON, 400, "messages",
     "missing_required_parameter"),
    ("empty-messages", "POST", CHAT, _json({"model": M, "messages": []}), JSON, 400, "messages",
     None),
    ("bad-role", "POST", CHAT,
     _json({"model": M, "messages": [{"role": "wizard", "content": "x"}]}), JSON, 400,
     "messages[0].role", None),
    ("content-not-text", "POST", CHAT,
     _json({"model": M, "messages": [{"role": "user", "content": 42}]}), JSON, 400,
     "messages[0].content", None),
    ("image-part", "POST", CHAT, _json({"model": M, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
     JSON, 400, "messages[0].content[0].type", "unsupported_content_type"),
    ("max-tokens-zero", "POST", CHAT, _json({"model": M, "messages": USER, "max_tokens": 0}), JSON,
     400, "max_tokens", None),
    ("max-tokens-negative", "POST", COMPLETIONS,
     _json({"model": M, "prompt": "x", "max_tokens": -5}), JSON, 400, "max_tokens", None),
    ("max-tokens-huge", "POST", COMPLETIONS,
     _json({"model": M, "prompt": "x", "max_tokens": 10**12}), JSON, 400, "max_tokens", None),
    ("max-tokens-string", "POST", COMPLETIONS,
     _json({"model": M, "prompt": "x", "max_tokens": "ten"}), JSON, 400, "max_tokens", None),
    ("temperature-too-high", "POST", CHAT,
     _json({"model": M, "messages": USER, "temperature": 3}), JSON, 400, "temperature", None),
    ("top-p-zero", "POST", CHAT, _json({"model": M, "messages": USER, "top_p": 0}), JSON, 400,
     "top_p", None),
    ("n-too-many", "POST", CHAT, _json({"model": M, "messages": USER, "n": 17}), JSON, 400, "n",
     None),
    ("prompt-too-long", "POST", COMPLETIONS, _json({"model": M, "prompt": LONG_PROMPT}), JSON, 400,
     "prompt", "context_length_exceeded"),
    ("prompt-plus-max-tokens-too-long", "POST", COMPLETIONS,
     _json({"model": M, "prompt": "seven " * 100, "max_tokens": MAX_MODEL_LEN - 50}), JSON, 400,
     "max_tokens", "context_length_exceeded"),
    ("too-many-batched-prompts", "POST", COMPLETIONS, _json({"model": M, "prompt": ["a"] * 65}),
     JSON, 400, "prompt", None),
    ("suffix-unsupported", "POST", COMPLETIONS, _json({"model": M, "prompt": "a", "suffix": "b"}),
     JSON, 400, "suffix", "unsupported_parameter"),
    ("token-out-of-vocab", "POST", COMPLETIONS, _json({"model": M, "prompt": [1, 10**6]}), JSON,
     400, "prompt", None),
    ("stop-not-strings", "POST", CHAT, _json({"model": M, "messages": USER, "stop": [1]}), JSON,
     400, "stop", None),
    ("stop-five-strings", "POST", CHAT,
     _json({"model": M, "messages": USER, "stop": ["a", "b", "c", "d", "e"]}), JSON, 400, "stop",
     None),
    ("stop-too-long", "POST", CHAT, _json({"model": M, "messages": USER, "stop": "x" * 257}), JSON,
     400, "stop", None),
    ("prompt-too-many-chars", "POST", COMPLETIONS, _json({"model": M, "prompt": "x" * 40_000}),
     JSON, 400, "prompt", "context_length_exceeded"),
    ("invalid-utf8", "POST", CHAT, b'{"model": "tiny-scripted", "messages": "\xff"}', JSON, 400,
     None, "invalid_encoding"),
    ("stream-options-without-stream", "POST", CHAT,
     _json({"model": M, "messages": USER, "stream_options": {"include_usage": True}}), JSON, 400,
     "stream_options", None),
    ("top-logprobs-without-logprobs", "POST", CHAT,
     _json({"model": M, "messages": USER, "top_logprobs": 2}), JSON, 400, "top_logprobs", None),
    ("tool-choice-auto-unsupported", "POST", CHAT,
     _json({"model": M, "messages": USER, "tools": [{"type": "function", "function": F}]}), JSON,
     400, "tool_choice", "unsupported_parameter"),
    ("wrong-content-type", "POST", CHAT, _json({"model": M, "messages": USER}),
     {"Content-Type": "text/plain"}, 415, None, "unsupported_media_type"),
    ("body-too-large", "POST", COMPLETIONS, _json({"model": M, "prompt": "x" * 100_000}), JSON, 413,
     None, "request_too_large"),
    ("body-too-large-chunked", "POST", COMPLETIONS,
     iter([_json({"model": M, "prompt": "x" * 100_000})]), JSON, 413, None, "request_too_large"),
    ("unknown-route", "POST", "/v1/embeddings", _json({}), JSON, 404, None, "not_found"),
    ("wrong-method", "GET", COMPLETIONS, None, {}, 405, None, "method_not_allowed"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "param", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_request_gets_openai_error(
    stack: Stack,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    got_status, got_headers, raw = _request(stack, method, path, body, headers)
    assert got_status == status, raw
    assert got_headers["Content-Type"].startswith("application/json")
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    if status == 405:
        assert "POST" in got_headers["Allow"]
    assert stack.prefill.prefill_requests == []  # rejected before any worker saw it
    # ... and the server still serves.
    ok_status, _, ok_raw = _request(
        stack, "POST", COMPLETIONS, _json({"model": M, "prompt": "x", "max_tokens": 2}), JSON
    )
    assert ok_status == 200, ok_raw
    assert json.loads(ok_raw)["choices"][0]["text"] == "Hell"


def test_context_length_message_reads_like_vllm(stack: Stack) -> None:
    _, _, raw = _request(
        stack, "POST", COMPLETIONS, _json({"model": M, "prompt": LONG_PROMPT}), JSON
    )
    assert json.loads(raw)["error"]["message"].startswith(
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens."
    )


def test_missing_content_type_is_accepted(stack: Stack) -> None:
    status, _, raw = _request(
        stack, "POST", COMPLETIONS, _json({"model": M, "prompt": "x", "max_tokens": 1}), {}
    )
    assert status == 200, raw


@pytest.fixture
def own_stack(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> Any:
    stack = start_stack(
        loop_thread, tiny_model_dir, model_tokenizer, registry={"health_check_interval_s": 0.1}
    )
    yield stack
    stop_stack(stack)


def _body() -> bytes:
    return _json({"model": M, "messages": USER, "max_tokens": 4})


def _wait_for_status(stack: Stack, path: str, status: int) -> None:
    deadline = time.monotonic() + 5
    while _request(stack, "GET", path, None, {})[0] != status:
        assert time.monotonic() < deadline, f"{path} never answered {status}"
        time.sleep(0.05)


# With the prefill worker down the decode worker serves requests itself (conditional
# disaggregation): tests/integration/controlplane/test_routing.py.
@pytest.mark.parametrize("down", ["decode"])
def test_worker_down_gives_503_then_recovers(own_stack: Stack, down: str) -> None:
    stack = own_stack
    worker = stack.decode if down == "decode" else stack.prefill
    port = worker.port
    stack.loop.run(worker.stop())

    status, _, raw = _request(stack, "POST", CHAT, _body(), JSON)
    assert status == 503, raw
    error = json.loads(raw)["error"]
    assert error["type"] == "server_error"
    assert error["code"] == "worker_unavailable"
    assert worker.endpoint not in error["message"]  # internal: logged only
    _wait_for_status(stack, "/health", 503)
    status, _, raw = _request(stack, "POST", CHAT, _body(), JSON)  # now refused without a call
    assert status == 503 and json.loads(raw)["error"]["code"] == "worker_unavailable"

    stack.loop.run(worker.start(port))  # the worker comes back on the same port
    _wait_for_status(stack, "/health", 200)
    status, _, raw = _request(stack, "POST", CHAT, _body(), JSON)
    assert status == 200, raw


def test_worker_not_ready_makes_health_503(own_stack: Stack) -> None:
    own_stack.prefill.ready = False
    _wait_for_status(own_stack, "/health", 503)
    health = json.loads(_request(own_stack, "GET", "/health", None, {})[2])
    assert {w["role"]: w["ready"] for w in health["workers"]} == {
        "prefill": False,
        "decode": True,
    }
    own_stack.prefill.ready = True
    _wait_for_status(own_stack, "/health", 200)


def test_slow_health_answers_are_tolerated_within_the_stall_bound(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> None:
    stack = start_stack(
        loop_thread,
        tiny_model_dir,
        model_tokenizer,
        # no background checks: this test drives them
        registry={
            "health_check_interval_s": 3600.0,
            "health_check_timeout_s": 0.05,
            "stall_floor_s": 2.0,
        },
    )
    try:
        registry = stack.server.registry
        stack.loop.run(registry.check_all())  # an answer now: the silence starts here
        stack.decode.health_delay_s = 0.2
        for _ in range(3):
            stack.loop.run(registry.check_all())
            assert registry.is_ready()  # a busy worker is not turned away at once
        time.sleep(2.1)  # unanswered for longer than the bound (the floor: nothing in flight)
        stack.loop.run(registry.check_all())
        assert not registry.is_ready()
        decode = {i.endpoint: i for i in registry.list_instances()}[stack.decode.endpoint]
        assert decode.state is InstanceState.DEAD
        assert decode.detail.startswith("unresponsive: Health has not answered for ")
        assert "(bound 2 s; timeout: " in decode.detail
        stack.decode.health_delay_s = 0.0
        stack.loop.run(registry.check_all())
        assert registry.is_ready()
    finally:
        stop_stack(stack)
