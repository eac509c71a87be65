"""The body's bytes (UTF-8, JSON, valid Unicode) and the prompt's length before tokenization."""

from __future__ import annotations

import json

import pytest

from controlplane.api.openai_protocol import OpenAIError
from controlplane.api.request_checks import check_prompt_chars, parse_json_body
from controlplane.api.sampling import RequestLimits


def test_valid_bodies_parse_as_json() -> None:
    assert parse_json_body(b'{"a": [1, "x"]}') == {"a": [1, "x"]}
    # A valid escaped surrogate pair is one code point (what json.dumps sends for an emoji).
    assert parse_json_body(json.dumps({"s": "😀 ok"}).encode()) == {"s": "😀 ok"}
    assert parse_json_body('{"s": "été"}'.encode()) == {"s": "été"}
    # An escaped backslash before "ud800" is text, not an escape.
    assert parse_json_body(b'{"s": "\\\\ud800"}') == {"s": "\\ud800"}


# (id, raw body, param, code)
BAD_BODIES = [
    ("not-json", b"{nope", None, "invalid_json"),
    ("invalid-utf8", b'{"s": "\xff"}', None, "invalid_encoding"),
    ("encoded-surrogate-bytes", b'{"s": "\xed\xa0\x80"}', None, "invalid_encoding"),
    ("utf16-body", '{"s": 1}'.encode("utf-16"), None, "invalid_encoding"),
    ("lone-high-surrogate-prompt", b'{"prompt": "a\\ud800b"}', "prompt", "invalid_unicode"),
    ("lone-low-surrogate", b'{"prompt": "\\udc00"}', "prompt", "invalid_unicode"),
    ("reversed-pair", b'{"prompt": "\\ude00\\ud83d"}', "prompt", "invalid_unicode"),
    ("in-a-message", b'{"messages": [{"content": "ok"}, {"content": "\\uD800"}]}', "messages[1]",
     "invalid_unicode"),
    ("in-a-content-part", b'{"messages": [{"content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages[0]", "invalid_unicode"),
    ("in-stop", b'{"stop": ["ok", "\\ud800"]}', "stop", "invalid_unicode"),
    ("in-cache-salt", b'{"cache_salt": "\\ud800"}', "cache_salt", "invalid_unicode"),
    ("in-user", b'{"user": "\\ud800"}', "user", "invalid_unicode"),
    ("in-model", b'{"model": "\\udfff"}', "model", "invalid_unicode"),
    ("in-a-key", b'{"\\ud800": 1}', None, "invalid_unicode"),
    ("top-level-string", b'"\\ud800"', None, "invalid_unicode"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "param", "code"), [pytest.param(*case[1:], id=case[0]) for case in BAD_BODIES]
)
def test_bad_bodies_are_400(raw: bytes, param: str | None, code: str) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_json_body(raw)
    error = info.value
    assert (error.status, error.param, error.code) == (400, param, code)
    json.dumps(error.to_dict()).encode("ascii")  # the message itself is encodable


LIMITS = RequestLimits(max_model_len=100, vocab_size=50, max_chars_per_token=4)


@pytest.mark.parametrize(
    ("num_chars", "max_tokens"),
    [(0, None), (396, None), (99 * 4, None), (90 * 4, 10), (1, 99), (89 * 4 + 1, 10)],
)
def test_prompt_chars_that_may_fit_pass(num_chars: int, max_tokens: int | None) -> None:
    check_prompt_chars(num_chars, max_tokens, LIMITS, param="prompt")


@pytest.mark.parametrize(
    ("num_chars", "max_tokens", "param", "at_least"),
    [
        (99 * 4 + 1, None, "prompt", 100),  # 100 tokens at least: nothing left to generate
        (400, None, "prompt", 100),
        (10**6, None, "prompt", 250_000),
        (90 * 4 + 1, 10, "max_tokens", 101),  # fits alone, not with 10 more
        (4, 100, "max_tokens", 101),
    ],
)
def test_prompt_chars_that_cannot_fit_are_refused(
    num_chars: int, max_tokens: int | None, param: str, at_least: int
) -> None:
    with pytest.raises(OpenAIError) as info:
        check_prompt_chars(num_chars, max_tokens, LIMITS, param="prompt")
    error = info.value
    assert (error.status, error.param, error.code) == (400, param, "context_length_exceeded")
    assert error.message.startswith("This model's maximum context length is 100 tokens.")
    assert f"at least {at_least} tokens" in error.message
