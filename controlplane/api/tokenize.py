"""vLLM's utility routes: ``POST /tokenize``, ``POST /detokenize`` and ``GET /version``.

The same requests and answers as vLLM's OpenAI server, with the gateway's own tokenizer (the one
every prompt goes through, so ``/tokenize`` counts what a generation request would send):

- ``/tokenize`` with ``prompt`` (text; ``add_special_tokens``, default true) or ``messages``
  (the chat template; ``add_generation_prompt`` default true, ``continue_final_message`` default
  false, ``add_special_tokens`` default false), ``return_token_strs`` (default false):
  ``{"count", "max_model_len", "tokens", "token_strs"}``.
- ``/detokenize`` with ``tokens`` (ids within the vocabulary): ``{"prompt": text}``.
- ``/version``: ``{"version": Strata's version}``.

``model`` is optional (vLLM's too); when given it must be the served model. Unlike vLLM's server,
where only ``/v1`` routes need the API key, ``/tokenize`` and ``/detokenize`` need it too when keys
are configured (app.py's tenant middleware): they run the tokenizer, which costs CPU like a
generation request's. Fields vLLM has that these do not honour (``chat_template``,
``chat_template_kwargs``, ``tools``, ``mm_processor_kwargs``) are refused with 400 naming them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Final

from controlplane.api.fields import (
    check_in_vocabulary,
    invalid,
    is_int,
    opt_bool,
    parse_model,
    require_object,
    type_name,
)
from controlplane.api.openai_protocol import ChatMessage, parse_messages
from controlplane.api.sampling import RequestLimits
from controlplane.api.tools import ToolsRequest, parse_tool_list
from controlplane.text.tokenizer import ModelTokenizer

__all__ = [
    "DetokenizeRequest",
    "TokenizeRequest",
    "parse_detokenize_request",
    "parse_tokenize_request",
    "strata_version",
    "tokenize_answer",
]

_UNHONOURED: Final = ("chat_template", "chat_template_kwargs", "mm_processor_kwargs")


@dataclass(frozen=True, slots=True)
class TokenizeRequest:
    prompt: str | None
    """Text to tokenize; None: ``messages`` is given."""
    messages: tuple[ChatMessage, ...]
    add_special_tokens: bool
    add_generation_prompt: bool
    continue_final_message: bool
    return_token_strs: bool
    tools: list[dict[str, Any]] | None = None
    """For ``messages``: the tools the chat template renders (as a chat request's)."""


@dataclass(frozen=True, slots=True)
class DetokenizeRequest:
    tokens: tuple[int, ...]


def _check_model(obj: dict[str, Any], served_model_name: str) -> None:
    if obj.get("model") is not None:
        parse_model(obj, served_model_name)


def parse_tokenize_request(body: object, *, served_model_name: str) -> TokenizeRequest:
    obj = require_object(body)
    _check_model(obj, served_model_name)
    for name in _UNHONOURED:
        if obj.get(name):
            raise invalid(
                name, f"'{name}' is not supported by this server.", "unsupported_parameter"
            )
    has_prompt, has_messages = obj.get("prompt") is not None, obj.get("messages") is not None
    if has_prompt == has_messages:
        raise invalid(
            "prompt" if has_prompt else "messages",
            "Give either 'prompt' (text) or 'messages' (a chat), not both and not neither.",
        )
    return_token_strs = opt_bool(obj, "return_token_strs", default=False)
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise invalid("prompt", f"'prompt' must be a string, got {type_name(prompt)}.")
        return TokenizeRequest(
            prompt=prompt,
            messages=(),
            add_special_tokens=opt_bool(obj, "add_special_tokens", default=True),
            add_generation_prompt=False,
            continue_final_message=False,
            return_token_strs=return_token_strs,
        )
    add_generation_prompt = opt_bool(obj, "add_generation_prompt", default=True)
    continue_final_message = opt_bool(obj, "continue_final_message", default=False)
    if add_generation_prompt and continue_final_message:
        raise invalid(
            "continue_final_message",
            "'continue_final_message' and 'add_generation_prompt' cannot both be true.",
        )
    raw_tools = obj.get("tools")
    tools = None
    if raw_tools:
        tools = ToolsRequest(parse_tool_list(raw_tools), "none").template_tools()
    return TokenizeRequest(
        prompt=None,
        tools=tools,
        messages=parse_messages(obj),
        add_special_tokens=opt_bool(obj, "add_special_tokens", default=False),
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        return_token_strs=return_token_strs,
    )


def parse_detokenize_request(
    body: object, *, served_model_name: str, limits: RequestLimits
) -> DetokenizeRequest:
    obj = require_object(body)
    _check_model(obj, served_model_name)
    tokens = obj.get("tokens")
    if tokens is None:
        raise invalid(
            "tokens", "Missing required parameter: 'tokens'.", "missing_required_parameter"
        )
    if not isinstance(tokens, list) or not all(is_int(t) for t in tokens):
        raise invalid("tokens", "'tokens' must be a list of integer token ids.")
    check_in_vocabulary(tokens, limits.vocab_size, "tokens")
    return DetokenizeRequest(tuple(tokens))


Run = Callable[[Callable[[], Any]], Awaitable[Any]]
"""Runs a tokenizer call off the event loop (the gateway's tokenizer pool)."""


async def tokenize_answer(
    request: TokenizeRequest, tokenizer: ModelTokenizer, limits: RequestLimits, run: Run
) -> dict[str, Any]:
    """vLLM's /tokenize answer for ``request``."""

    def encode() -> tuple[list[int], list[str] | None]:
        if request.prompt is not None:
            ids = tokenizer.encode_prompt(
                request.prompt, add_special_tokens=request.add_special_tokens
            )
        else:
            text = tokenizer.render_chat(
                request.messages,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                tools=request.tools,
            )
            ids = tokenizer.encode_prompt(text, add_special_tokens=request.add_special_tokens)
        return ids, tokenizer.token_strings(ids) if request.return_token_strs else None

    ids, strings = await run(encode)
    return {
        "count": len(ids),
        "max_model_len": limits.max_model_len,
        "tokens": ids,
        "token_strs": strings,
    }


DISTRIBUTION: Final = "strata-serve"
"""Strata's name as a Python distribution (pyproject.toml)."""


def strata_version() -> str:
    """The installed Strata's version (``/version``); "unknown" run from a checkout that was
    never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
