"""Bad input against the real server gets OpenAI's error JSON with the right 4xx, and the server
keeps serving: a good request after the whole table still succeeds."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import StrataServer

JSON = {"content-type": "application/json"}


def _chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return body


# (case id, method, path, headers, body (dict -> JSON, str/bytes -> raw), expected status, param)
BAD_REQUESTS: list[tuple[str, str, str, dict[str, str], Any, int, str | None]] = [
    ("invalid-json", "POST", "/v1/chat/completions", JSON, b"{not json", 400, None),
    ("body-not-object", "POST", "/v1/chat/completions", JSON, b"[1, 2]", 400, None),
    ("missing-messages", "POST", "/v1/chat/completions", JSON, {"model": "MODEL"}, 400, "messages"),
    ("missing-model", "POST", "/v1/completions", JSON, {"prompt": "hi"}, 400, "model"),
    (
        "messages-wrong-type",
        "POST",
        "/v1/chat/completions",
        JSON,
        _chat(messages="hi"),
        400,
        "messages",
    ),
    ("empty-messages", "POST", "/v1/chat/completions", JSON, _chat(messages=[]), 400, "messages"),
    (
        "unknown-model",
        "POST",
        "/v1/chat/completions",
        JSON,
        _chat(model="no-such-model"),
        404,
        "model",
    ),
    (
        "negative-max-tokens",
        "POST",
        "/v1/chat/completions",
        JSON,
        _chat(max_tokens=-5),
        400,
        "max_tokens",
    ),
    (
        "huge-max-tokens",
        "POST",
        "/v1/chat/completions",
        JSON,
        _chat(max_tokens=10**9),
        400,
        "max_tokens",
    ),
    (
        "max-tokens-string",
        "POST",
        "/v1/chat/completions",
        JSON,
        _chat(max_tokens="ten"),
        400,
        "max_tokens",
    ),
    (
        "temperature-out-of-range",
        "POST",
        "/v1/chat/completions",
        JSON,
        _chat(temperature=7),
        400,
        "temperature",
    ),
    (
        "prompt-too-long",
        "POST",
        "/v1/completions",
        JSON,
        {"model": "MODEL", "prompt": "cache " * 5000},
        400,
        None,
    ),
    ("n-too-many", "POST", "/v1/chat/completions", JSON, _chat(n=17), 400, "n"),
    (
        "wrong-content-type",
        "POST",
        "/v1/chat/completions",
        {"content-type": "text/plain"},
        b"hello",
        415,
        None,
    ),
    ("unknown-route", "POST", "/v1/embeddings-nope", JSON, _chat(), 404, None),
    ("wrong-method", "GET", "/v1/chat/completions", {}, None, 405, None),
]


@pytest.fixture(scope="module")
def http(tiny_server: StrataServer) -> httpx.Client:
    return httpx.Client(base_url=tiny_server.base_url, timeout=60)


def _send(
    http: httpx.Client, model: str, method: str, path: str, headers: dict[str, str], body: Any
) -> httpx.Response:
    raw = (
        json.dumps(body).replace('"MODEL"', json.dumps(model)).encode()
        if isinstance(body, dict)
        else body
    )
    return http.request(method, path, headers=headers, content=raw)


def test_bad_requests_get_openai_errors_and_server_keeps_serving(
    tiny_server: StrataServer, http: httpx.Client
) -> None:
    failures = []
    for case, method, path, headers, body, status, param in BAD_REQUESTS:
        resp = _send(http, tiny_server.model, method, path, headers, body)
        try:
            err = resp.json()["error"]
            ok = (
                resp.status_code == status
                and isinstance(err["message"], str)
                and err["message"]
                and isinstance(err["type"], str)
                and (param is None or err.get("param") == param)
            )
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            failures.append(f"{case}: {resp.status_code} {resp.text[:300]}")
    assert not failures, "\n".join(failures)

    good = http.post(
        "/v1/chat/completions",
        json={
            "model": tiny_server.model,
            "messages": [{"role": "user", "content": "still there?"}],
            "max_tokens": 5,
        },
    )
    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["message"]["role"] == "assistant"
    assert http.get("/health").status_code == 200
