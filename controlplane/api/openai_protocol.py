"""OpenAI request parsing and validation: JSON objects in, typed frozen dataclasses out.

Every rejection is an `OpenAIError` carrying the HTTP status and the OpenAI error fields (type,
param, code), so the HTTP layer turns it into `{"error": {...}}` without knowing why it happened.

Rules follow OpenAI's API, with vLLM's extensions where they matter for serving (`ignore_eos`,
`stop_token_ids`, `cache_salt`, `top_k`, `min_p`, `repetition_penalty`, `min_tokens`). Fields
that ask for a feature this server does not implement (`best_of`, `suffix`, ...) are
rejected with 400 unless they carry their "off" value, and so are fields it does not know (vLLM
and OpenAI ignore those): silently dropping either would return an answer the client did not
ask for. OpenAI's metadata fields (`user`; on chat also `metadata`, `store`, `service_tier`)
change no answer and are accepted.

What is checked beyond the fields (the body's bytes, the prompt's length before and after
tokenization) lives in `controlplane.api.request_checks`.

The sampling fields, the bounds a request is checked against (`RequestLimits`) and the model's
defaults live in `controlplane.api.sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final

from controlplane.api.fields import (
    OpenAIError,
    check_in_vocabulary,
    invalid,
    is_int,
    opt_bool,
    opt_int,
    parse_model,
    reject_unsupported,
    require_object,
    type_name,
)
from controlplane.api.sampling import (
    MAX_LOGPROBS,
    RequestLimits,
    SamplingDefaults,
    SamplingOptions,
    parse_sampling,
)
from controlplane.api.tools import ToolsRequest, parse_tools

__all__ = [
    "COMPLETIONS_DEFAULT_MAX_TOKENS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "GenerationRequestFields",
    "OpenAIError",
    "RequestLimits",
    "SamplingOptions",
    "parse_chat_completion_request",
    "parse_completion_request",
    "parse_messages",
]

COMPLETIONS_DEFAULT_MAX_TOKENS: Final = 16
"""OpenAI's (and vLLM's) default for legacy completions; chat fills the context window."""

CHAT_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})

# Field -> the values that mean "feature off", which are accepted and ignored.
_VLLM_DEFAULTS: Final[dict[str, tuple[object, ...]]] = {
    # vLLM's extensions not served yet: accepted at their defaults only.
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "prompt_logprobs": (None,),
    "priority": (None, 0),
    "return_tokens_as_token_ids": (None, False),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
    "mm_processor_kwargs": (None,),
}
_UNSUPPORTED_COMPLETION: Final[dict[str, tuple[object, ...]]] = {
    **_VLLM_DEFAULTS,
    "add_special_tokens": (None, True),
    "best_of": (None, 1),
    "suffix": (None, ""),
}
_UNSUPPORTED_CHAT: Final[dict[str, tuple[object, ...]]] = {
    **_VLLM_DEFAULTS,
    "add_special_tokens": (None, False),
    "echo": (None, False),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "documents": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "prediction": (None,),
    "modalities": (None, ["text"]),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}
# OpenAI fields that do not change the answer, accepted as they are (OpenAI's own metadata).
_METADATA: Final = frozenset(
    {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
)
_SERVED: Final = frozenset(
    {
        "model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream",
        "stream_options", "ignore_eos", "stop_token_ids", "cache_salt", "return_token_ids",
        "top_k", "min_p", "repetition_penalty", "min_tokens", "presence_penalty",
        "frequency_penalty", "logit_bias", "logprobs", "response_format", "structured_outputs",
    }
)  # fmt: skip
_COMPLETION_FIELDS: Final = (
    _SERVED | {"prompt", "echo", "user"} | frozenset(_UNSUPPORTED_COMPLETION)
)
_CHAT_FIELDS: Final = (
    _SERVED
    | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice"}
    | {"parallel_tool_calls"}
    | frozenset(_UNSUPPORTED_CHAT)
    | _METADATA
)


Prompt = str | tuple[int, ...]
"""A completions prompt: a text, or token ids."""
MAX_PROMPTS: Final = 64
"""Prompts one completions request may batch: each is a generation of its own (times ``n``)."""

MAX_CACHE_SALT_CHARS = 256
"""A cache salt names a namespace; every worker keeps a memo of the roots of the salts it saw."""


@dataclass(frozen=True, slots=True)
class GenerationRequestFields:
    """What completions and chat requests both carry."""

    model: str
    sampling: SamplingOptions
    stream: bool
    include_usage: bool
    cache_salt: str
    return_token_ids: bool
    """vLLM's extension: also return prompt and generated token ids."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CompletionRequest(GenerationRequestFields):
    prompts: tuple[Prompt, ...]
    """One or more (a batch): each a text to tokenize, or token ids used as they are."""
    echo: bool = False
    """Each choice's text starts with its prompt's."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str | tuple[str, ...]
    """A string, or the texts of a list of {"type": "text"} parts, in order."""
    name: str | None
    tool_calls: tuple[tuple[str, str, str], ...] = ()
    """An assistant's calls: (id, function name, arguments as JSON text)."""
    tool_call_id: str | None = None
    """A tool message: the call it answers."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatCompletionRequest(GenerationRequestFields):
    messages: tuple[ChatMessage, ...]
    tools: ToolsRequest | None = None


def parse_completion_request(
    body: object,
    *,
    served_model_name: str,
    limits: RequestLimits,
    defaults: SamplingDefaults | None = None,
) -> CompletionRequest:
    obj, model = _parse_head(body, served_model_name, _UNSUPPORTED_COMPLETION, _COMPLETION_FIELDS)
    prompts = _parse_prompts(obj, limits)
    max_tokens = opt_int(obj, "max_tokens", minimum=1, maximum=limits.max_model_len)
    # Completions' logprobs is the top count: 0 still returns the sampled token's logprob.
    logprobs = opt_int(obj, "logprobs", minimum=0, maximum=MAX_LOGPROBS)
    echo = opt_bool(obj, "echo", default=False)
    if echo and logprobs is not None:
        # vLLM then returns the prompt's logprobs too, which the workers do not compute yet.
        raise invalid(
            "echo", "'echo' together with 'logprobs' is not supported yet.", "unsupported_parameter"
        )
    return CompletionRequest(
        prompts=prompts,
        echo=echo,
        **_parse_common(obj, model, max_tokens, limits, defaults, logprobs),
    )


def parse_chat_completion_request(
    body: object,
    *,
    served_model_name: str,
    limits: RequestLimits,
    defaults: SamplingDefaults | None = None,
) -> ChatCompletionRequest:
    obj, model = _parse_head(body, served_model_name, _UNSUPPORTED_CHAT, _CHAT_FIELDS)
    messages = parse_messages(obj)
    # max_completion_tokens replaced max_tokens in OpenAI's chat API; both are accepted.
    max_completion_tokens = opt_int(
        obj, "max_completion_tokens", minimum=1, maximum=limits.max_model_len
    )
    max_tokens = opt_int(obj, "max_tokens", minimum=1, maximum=limits.max_model_len)
    if max_completion_tokens is not None:
        max_tokens = max_completion_tokens
    # Chat's logprobs is a switch, top_logprobs the top count (OpenAI refuses one without the
    # other; vLLM ignores top_logprobs then: refused here, never ignored).
    top_logprobs = opt_int(obj, "top_logprobs", minimum=0, maximum=MAX_LOGPROBS)
    logprobs = (top_logprobs or 0) if opt_bool(obj, "logprobs", default=False) else None
    if logprobs is None and top_logprobs:
        raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs' set to true.")
    tools = parse_tools(obj)
    common = _parse_common(obj, model, max_tokens, limits, defaults, logprobs)
    constraint = tools.constraint() if tools else None
    if constraint is not None:
        if common["sampling"].structured is not None:
            raise invalid(
                "tool_choice",
                "A forced 'tool_choice' and a 'response_format' (or 'structured_outputs') "
                "cannot both constrain the answer.",
            )
        common["sampling"] = replace(common["sampling"], structured=constraint)
    return ChatCompletionRequest(messages=messages, tools=tools, **common)


def _parse_head(
    body: object,
    served_model_name: str,
    unsupported: dict[str, tuple[object, ...]],
    known: frozenset[str],
) -> tuple[dict[str, Any], str]:
    """The body as an object, and its model; rejects features this server does not implement
    and fields it does not know (vLLM's extensions not served yet among them: a field that
    would be ignored is refused, naming it)."""
    obj = require_object(body)
    model = parse_model(obj, served_model_name)
    reject_unsupported(obj, unsupported)
    for name in obj:
        if name not in known:
            raise invalid(
                name,
                f"'{name}' is not supported by this server: it would be ignored, so the request "
                "is refused (docs/openai-parity.md lists what is served).",
                "unsupported_parameter",
            )
    return obj, model


def _parse_common(
    obj: dict[str, Any],
    model: str,
    max_tokens: int | None,
    limits: RequestLimits,
    defaults: SamplingDefaults | None,
    logprobs: int | None,
) -> dict[str, Any]:
    """The :class:`GenerationRequestFields` of a request, as keyword arguments."""
    sampling = parse_sampling(
        obj,
        max_tokens=max_tokens,
        limits=limits,
        defaults=defaults or SamplingDefaults(),
        logprobs=logprobs,
    )
    stream, include_usage = _parse_stream(obj)
    return dict(
        model=model,
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
        cache_salt=_parse_cache_salt(obj),
        return_token_ids=opt_bool(obj, "return_token_ids", default=False),
    )


# ---------------------------------------------------------------------------------------------
# Field parsers. Each raises OpenAIError(400, param=<field>) with a message naming the field.


def _parse_stream(obj: dict[str, Any]) -> tuple[bool, bool]:
    stream = opt_bool(obj, "stream", default=False)
    options = obj.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise invalid("stream_options", "'stream_options' must be an object.")
    if not stream:
        raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true.")
    for key, value in options.items():
        if key == "continuous_usage_stats" and value in (None, False):
            continue  # vLLM's usage on every chunk: off
        if key != "include_usage":
            raise invalid(
                f"stream_options.{key}",
                f"'stream_options.{key}' is not supported by this server.",
                "unsupported_parameter",
            )
    include_usage = options.get("include_usage")
    if include_usage is None:
        return stream, False
    if not isinstance(include_usage, bool):
        raise invalid("stream_options.include_usage", "'include_usage' must be a boolean.")
    return stream, include_usage


def _parse_cache_salt(obj: dict[str, Any]) -> str:
    value = obj.get("cache_salt")
    if value is None:
        return ""
    if not isinstance(value, str) or not value:
        raise invalid("cache_salt", "'cache_salt' must be a non-empty string.")
    if len(value) > MAX_CACHE_SALT_CHARS:
        raise invalid(
            "cache_salt", f"'cache_salt' must be at most {MAX_CACHE_SALT_CHARS} characters."
        )
    return value


def _parse_prompts(obj: dict[str, Any], limits: RequestLimits) -> tuple[Prompt, ...]:
    """One prompt (a string, or a list of token ids), or a batch of them (a list of strings or
    of lists of token ids): each its own generation, as vLLM's server runs a batch."""
    if "prompt" not in obj or obj["prompt"] is None:
        raise invalid(
            "prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter"
        )
    prompt = obj["prompt"]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise invalid(
                "prompt", f"'prompt' may batch at most {MAX_PROMPTS} prompts, got {len(prompt)}."
            )
        return tuple(_parse_one_prompt(p, limits) for p in prompt)
    return (_parse_one_prompt(prompt, limits),)


def _parse_one_prompt(prompt: object, limits: RequestLimits) -> Prompt:
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt", "'prompt' must not be empty.")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise invalid(
            "prompt",
            "'prompt' must be a non-empty string or a non-empty list of token ids (or a list "
            "of those).",
        )
    if not all(is_int(t) for t in prompt):
        raise invalid("prompt", "'prompt' as a list must contain only integer token ids.")
    check_in_vocabulary(prompt, limits.vocab_size, "prompt")
    return tuple(prompt)


def parse_messages(obj: dict[str, Any]) -> tuple[ChatMessage, ...]:
    if "messages" not in obj or obj["messages"] is None:
        raise invalid(
            "messages", "Missing required parameter: 'messages'.", "missing_required_parameter"
        )
    raw = obj["messages"]
    if not isinstance(raw, list):
        raise invalid("messages", f"'messages' must be a list, got {type_name(raw)}.")
    if not raw:
        raise invalid("messages", "'messages' must contain at least one message.")
    return tuple(_parse_message(i, m) for i, m in enumerate(raw))


def _parse_message(index: int, raw: object) -> ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise invalid(where, f"'{where}' must be an object, got {type_name(raw)}.")
    role = raw.get("role")
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise invalid(
            f"{where}.role",
            f"'{where}.role' must be one of {sorted(CHAT_ROLES)}, got {role!r}.",
        )
    if raw.get("function_call"):
        raise invalid(
            f"{where}.function_call",
            "'function_call' (deprecated) is not supported: send 'tool_calls'.",
            "unsupported_parameter",
        )
    tool_calls = _parse_tool_calls(where, raw.get("tool_calls"), role)
    tool_call_id = raw.get("tool_call_id")
    if role == "tool" and not isinstance(tool_call_id, str):
        raise invalid(f"{where}.tool_call_id", f"'{where}.tool_call_id' must be a string.")
    if role != "tool":
        tool_call_id = None
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid(f"{where}.name", f"'{where}.name' must be a string.")
    content = raw.get("content")
    if content is None:
        if role != "assistant":
            raise invalid(f"{where}.content", f"'{where}.content' is required for role {role}.")
        content = ""
    if isinstance(content, str):
        return ChatMessage(role, content, name, tool_calls, tool_call_id)
    if not isinstance(content, list):
        raise invalid(
            f"{where}.content",
            f"'{where}.content' must be a string or a list of content parts.",
        )
    texts: list[str] = []
    for j, part in enumerate(content):
        part_where = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise invalid(part_where, f"'{part_where}' must be an object.")
        if part.get("type") != "text":
            raise invalid(
                f"{part_where}.type",
                f"Only text content parts are supported, got type {part.get('type')!r}.",
                "unsupported_content_type",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"{part_where}.text", f"'{part_where}.text' must be a string.")
        texts.append(text)
    return ChatMessage(role, tuple(texts), name, tool_calls, tool_call_id)


def _parse_tool_calls(where: str, raw: object, role: str) -> tuple[tuple[str, str, str], ...]:
    """An assistant message's ``tool_calls``: (id, name, arguments) each."""
    if raw is None or raw == []:
        return ()
    param = f"{where}.tool_calls"
    if role != "assistant" or not isinstance(raw, list):
        raise invalid(param, f"'{param}' must be a list, on an assistant message.")
    calls = []
    for call in raw:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise invalid(param, f"Each of '{param}' must have a 'function' object.")
        call_id, name, arguments = (
            call.get("id", ""),
            function.get("name"),
            function.get("arguments"),
        )
        if (
            not isinstance(call_id, str)
            or not isinstance(name, str)
            or not isinstance(arguments, str)
        ):
            raise invalid(param, f"Each of '{param}' needs a string id, name and arguments.")
        calls.append((call_id, name, arguments))
    return tuple(calls)
