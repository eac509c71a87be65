"""Checks of a request beyond its fields: the body's bytes, and the prompt's length before and
after tokenization.

* `parse_json_body`: the body must be UTF-8 (RFC 8259), JSON, and valid Unicode: JSON may escape a
  lone UTF-16 surrogate (``"\\ud800"``), which Python decodes into a string that no encoder
  accepts (the tokenizer, the gRPC string fields of the worker calls, the block-key hash). Such a
  request is refused here with 400, whatever field holds it, so no later step meets one.
* `check_prompt_chars`: before tokenizing, a prompt (a completions prompt, or the text the chat
  template renders) whose characters cannot fit the context window whatever its tokens turn out to
  be (no token stands for more than `RequestLimits.max_chars_per_token` characters) is refused
  with 400: tokenizing a megabyte (about a second of CPU) only to refuse it is the cost avoided.
* `check_context_length`: after tokenizing, the prompt and max_tokens against the window.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from controlplane.api.openai_protocol import OpenAIError
from controlplane.api.sampling import RequestLimits

__all__ = [
    "check_context_length",
    "check_prompt_chars",
    "parse_json_body",
]

# A JSON escape of a UTF-16 surrogate (\uD800-\uDFFF): only then can a decoded string hold one.
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89abcdefABCDEF]")
# A surrogate code point in a decoded string: JSON joins valid escaped pairs into one code point,
# so any that is left was lone.
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def parse_json_body(raw: bytes) -> Any:
    """The body's JSON value; 400 unless it is UTF-8, JSON and valid Unicode throughout."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OpenAIError(
            f"The request body is not valid UTF-8 (at byte {exc.start}).", code="invalid_encoding"
        ) from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise OpenAIError(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if _SURROGATE_ESCAPE.search(raw) is not None:
        _reject_lone_surrogates(body)
    return body


def _has_lone_surrogate(value: object) -> bool:
    # One C-speed pass: dumps keeps every string (keys too) as it is, then one regex search.
    return _SURROGATE.search(json.dumps(value, ensure_ascii=False)) is not None


def _reject_lone_surrogates(body: object) -> None:
    """400 naming the field (a top-level one, or the message) that holds a lone surrogate."""
    if not _has_lone_surrogate(body):
        return
    param: str | None = None
    if isinstance(body, dict):
        for key, value in body.items():
            if _SURROGATE.search(key) is not None:
                break  # the key itself: no name to give
            if _has_lone_surrogate(value):
                param = key
                if key == "messages" and isinstance(value, list):
                    param = next(
                        f"messages[{i}]" for i, m in enumerate(value) if _has_lone_surrogate(m)
                    )
                break
    where = f"'{param}'" if param is not None else "The request body"
    raise OpenAIError(
        f"{where} contains a lone UTF-16 surrogate (an escape such as \\ud800 without its "
        "pair), which is not valid Unicode text.",
        param=param,
        code="invalid_unicode",
    )


def check_context_length(
    num_prompt_tokens: int,
    max_tokens: int | None,
    max_model_len: int,
    *,
    param: str,
    default_max_tokens: int | None = None,
) -> int:
    """Return the number of tokens to generate, or raise 400 if the request does not fit.

    `max_tokens=None` (not given) means `default_max_tokens`, or the whole rest of the window if
    that is None, clamped to what the window leaves (at least one token must fit). Unlike vLLM
    0.32, which silently clamps an oversized max_tokens, an explicit max_tokens that does not fit
    is rejected: the client asked for something the server cannot deliver.
    """
    if num_prompt_tokens >= max_model_len:
        raise OpenAIError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt contains {num_prompt_tokens} input tokens, which leaves no room for any "
            f"output tokens. Please reduce the length of the input prompt.",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        room = max_model_len - num_prompt_tokens
        return room if default_max_tokens is None else min(room, default_max_tokens)
    if num_prompt_tokens + max_tokens > max_model_len:
        raise OpenAIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"input, {max_tokens} in the completion). Please reduce the length of the input "
            f"or the completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def check_prompt_chars(
    num_chars: int, max_tokens: int | None, limits: RequestLimits, *, param: str
) -> None:
    """Refuse (400) a prompt whose characters cannot fit the context window, before tokenizing.

    No token stands for more than `limits.max_chars_per_token` characters, so a prompt of n
    characters has at least ceil(n / max_chars_per_token) tokens; if that many already leave no
    room for one output token (or for an explicit max_tokens), `check_context_length` would refuse
    it after tokenization anyway, and tokenizing megabytes to learn that is the cost avoided.
    """
    min_tokens = -(-num_chars // limits.max_chars_per_token)
    window = limits.max_model_len
    if min_tokens >= window:
        raise OpenAIError(
            f"This model's maximum context length is {window} tokens. However, your prompt is "
            f"{num_chars} characters long, which is at least {min_tokens} tokens (no token stands "
            f"for more than {limits.max_chars_per_token} characters) and leaves no room for any "
            f"output tokens. Please reduce the length of the input prompt.",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is not None and min_tokens + max_tokens > window:
        raise OpenAIError(
            f"This model's maximum context length is {window} tokens. However, you requested at "
            f"least {min_tokens + max_tokens} tokens (your prompt is {num_chars} characters long, "
            f"at least {min_tokens} tokens, and {max_tokens} in the completion). Please reduce "
            f"the length of the input or the completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )
