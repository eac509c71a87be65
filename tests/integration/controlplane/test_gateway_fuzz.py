"""Random HTTP requests against the real gateway (scripted workers): bodies mutated from valid
ones (wrong types, huge numbers, deep nesting, random Unicode with lone surrogates, invalid
UTF-8), random paths, methods and headers. Every answer is a 2xx or OpenAI's error JSON with a
4xx (never a 5xx), the process's memory stays bounded, and a good request succeeds after.
Seeded: the same requests every run."""

from __future__ import annotations

import http.client
import json
import random
import urllib.parse
from typing import Any

from tests.integration.controlplane.conftest import SERVED_MODEL_NAME, Stack

NUM_REQUESTS = 2000
RSS_GROWTH_BYTES = 64 * 1024 * 1024
PATHS = ["/v1/completions", "/v1/chat/completions"]
OTHER_PATHS = ["/v1/models", "/health", "/v1/embeddings", "/v1/completions/x", "/%ff", "/"]
CONTENT_TYPES = [
    "application/json", "application/json; charset=utf-8", "text/plain",
    "application/x-www-form-urlencoded", "application/vnd.api+json", "\u00e9/\u00e9",
]  # fmt: skip
STRINGS = [
    "", "x", "Hello", "\\ud800", "\\udfff", "\\ud83d\\ude00", "\u00e9t\u00e9", "\u65e5\u672c",
    "\x00", "<|im_start|>", "a" * 300, "\\\\ud800",
]  # fmt: skip


Request = tuple[str, str, bytes | None, dict[str, str]]


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2**63, -(2**64), 10**30, 7])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, 2.0, 1.5])
    if kind in (4, 5):
        return "".join(rng.choice(STRINGS) for _ in range(rng.randint(0, 3)))
    if kind in (6, 7):
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["role", "content", "type", "text", "k"]): _random_value(rng, depth + 1)}


def _base(rng: random.Random, path: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": SERVED_MODEL_NAME, "max_tokens": rng.randint(1, 4)}
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        body["prompt"] = "Hello"
    return body


def _encode(body: dict[str, Any]) -> bytes:
    # Strings in STRINGS spell JSON escapes (\ud800) literally: undo json.dumps' escaping of them.
    return json.dumps(body, ensure_ascii=False).replace("\\\\u", "\\u").encode("utf-8", "replace")


def _random_request(rng: random.Random) -> Request:
    roll = rng.random()
    content_type = "application/json" if roll < 0.7 else rng.choice(CONTENT_TYPES)
    headers = {"Content-Type": content_type} if roll < 0.95 else {}
    if rng.random() < 0.1:
        method = rng.choice(["GET", "PUT", "DELETE", "POST"])
        return method, rng.choice(OTHER_PATHS), None if method == "GET" else b"{}", headers
    path = rng.choice(PATHS)
    body = _base(rng, path)
    for _ in range(rng.randint(1, 4)):
        field = rng.choice(
            ["model", "messages", "prompt", "stop", "stream", "stream_options", "max_tokens",
             "temperature", "top_p", "seed", "n", "cache_salt", "user", "stop_token_ids",
             "logprobs", "ignore_eos", "return_token_ids", "extra"]
        )  # fmt: skip
        body[field] = _random_value(rng)
    raw = _encode(body)
    roll = rng.random()
    if roll < 0.05:
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))  # not even UTF-8
    elif roll < 0.1:
        raw = raw[: rng.randrange(len(raw) + 1)]  # cut short
    elif roll < 0.12:
        raw = b"[" * 5000 + b"]" * 5000  # deep nesting
    if rng.random() < 0.05:
        headers["X-Strata-Ttft-Slo-Ms"] = rng.choice(["10", "-1", "nan", "1e309", "\u00e9"])
    return "POST", path, raw, headers


def _send(conn: http.client.HTTPConnection, request: Request) -> tuple[int, bytes]:
    method, path, body, headers = request
    encoded = {k: v.encode("utf-8").decode("latin-1") for k, v in headers.items()}
    conn.request(method, path, body, encoded)
    response = conn.getresponse()
    return response.status, response.read()


def test_random_requests_get_clean_answers(stack: Stack) -> None:
    rng = random.Random(11)
    url = urllib.parse.urlsplit(stack.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    statuses: dict[int, int] = {}
    try:
        rss_start = 0
        for i in range(NUM_REQUESTS):
            if i == 200:
                rss_start = _rss_bytes()  # after warm-up (caches, pools)
            request = _random_request(rng)
            try:
                status, raw = _send(conn, request)
            except (ConnectionError, http.client.HTTPException):
                conn.close()  # the gateway closed it (e.g. after a 413): a new one
                conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
                status, raw = _send(conn, request)
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500, (request, status, raw[:500])
            if status >= 400:
                error = json.loads(raw)["error"]
                assert set(error) == {"message", "type", "param", "code"}, raw
        growth = _rss_bytes() - rss_start
        assert growth <= RSS_GROWTH_BYTES, growth
        assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses
        good = json.dumps({"model": SERVED_MODEL_NAME, "prompt": "x", "max_tokens": 2})
        assert _send(conn, ("POST", "/v1/completions", good.encode(), {}))[0] == 200
    finally:
        conn.close()
