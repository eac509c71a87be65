"""OpenAI request parsing and validation: JSON objects in, typed frozen dataclasses out.

Every rejection is an `OpenAIError` carrying the HTTP status and the OpenAI error fields (type,
param, code), so the HTTP layer turns it into `{"error": {...}}` without knowing why it happened.

Rules follow OpenAI's API, with vLLM's extensions where they matter for serving (`ignore_eos`,
`stop_token_ids`, `cache_salt`, `top_k`, `min_p`, `repetition_penalty`, `min_tokens`). Fields
that ask for a feature this server does not implement (logprobs, tools, penalties, ...) are
rejected with 400 unless they carry their "off" value, and so are fields it does not know (vLLM
and OpenAI ignore those): silently dropping either would return an answer the client did not
ask for. OpenAI's metadata fields (`user`; on chat also `metadata`, `store`, `service_tier`)
change no answer and are accepted.

What is checked beyond the fields (the body's bytes, the prompt's length before and after
tokenization) lives in `controlplane.api.request_checks`.

Bounds on what a request may ask for (`RequestLimits`, set from the gateway's HTTP config): at most
`max_stop_strings` stop strings (4, as OpenAI allows) of at most `max_stop_chars` characters each
(256: every stop string is matched against each generated piece and up to its length minus one
characters of output are held back, so both the per-token cost and the streaming delay grow with
them; real stop strings are delimiters of a few characters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from controlplane.api.fields import (
    OpenAIError,
    check_in_vocabulary,
    invalid,
    is_int,
    opt_bool,
    opt_float,
    opt_int,
    parse_model,
    reject_unsupported,
    require_object,
    type_name,
)

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

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
COMPLETIONS_DEFAULT_MAX_TOKENS: Final = 16
"""OpenAI's (and vLLM's) default for legacy completions; chat fills the context window."""
DEFAULT_MAX_STOP_STRINGS: Final = 4
"""OpenAI's limit on `stop`."""
DEFAULT_MAX_STOP_CHARS: Final = 256
"""Longest stop string, in characters (module docstring)."""
DEFAULT_MAX_CHARS_PER_TOKEN: Final = 32
"""Bound on the characters one token stands for (`request_checks.check_prompt_chars`): English
averages about 4, code 3, CJK 1 to 2; a text denser than 32 is runs of whitespace or repeats."""

CHAT_ROLES: Final = frozenset({"system", "developer", "user", "assistant"})

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
    "structural_tag": (None,),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
    "mm_processor_kwargs": (None,),
}
_UNSUPPORTED_COMPLETION: Final[dict[str, tuple[object, ...]]] = {
    **_VLLM_DEFAULTS,
    "add_special_tokens": (None, True),
    "logprobs": (None,),  # 0 still asks for the sampled token's logprob
    "echo": (None, False),
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
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "prediction": (None,),
    "parallel_tool_calls": (None, True, False),  # no tools: nothing to call in parallel
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
        "frequency_penalty", "logit_bias",
    }
)  # fmt: skip
_COMPLETION_FIELDS: Final = _SERVED | {"prompt"} | frozenset(_UNSUPPORTED_COMPLETION) | {"user"}
_CHAT_FIELDS: Final = (
    _SERVED | {"messages", "max_completion_tokens"} | frozenset(_UNSUPPORTED_CHAT) | _METADATA
)


MAX_CACHE_SALT_CHARS = 256
"""A cache salt names a namespace; every worker keeps a memo of the roots of the salts it saw."""


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What the served model allows (known once the workers reported their Health) and what the
    gateway's configuration allows a request to ask for."""

    max_model_len: int
    vocab_size: int
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS
    max_stop_chars: int = DEFAULT_MAX_STOP_CHARS
    max_chars_per_token: int = DEFAULT_MAX_CHARS_PER_TOKEN
    """No token stands for more characters than this (`request_checks.check_prompt_chars`)."""


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    max_tokens: int | None
    """Tokens to generate as the client asked; None = not given
    (see request_checks.check_context_length)."""
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    top_k: int = 0
    """vLLM's extension: sample among the k most likely tokens; 0 = all (the client's -1 too)."""
    min_p: float = 0.0
    """vLLM's extension: drop tokens less likely than min_p x the most likely one; 0 = off."""
    repetition_penalty: float = 1.0
    """vLLM's extension: divide (or multiply, when negative) the logits of tokens already in the
    prompt or the output; 1 = off."""
    min_tokens: int = 0
    """vLLM's extension: EOS and ``stop_token_ids`` cannot end the output before this many."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token already in the output; 0 = off."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it is in the output; 0 = off."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """OpenAI's: (token id, added to its logit), clamped to [-100, 100] as vLLM does."""

    @property
    def decode_samples_first(self) -> bool:
        """Whether the decode engine samples the first token itself (the prefill's is dropped):
        sampling whose state runs from the first token on, which one engine would carry — a
        seeded generator's position, the output's token counts of presence and frequency
        penalties (a first token handed over would be in the decode engine's prompt, not its
        output) (docs/design/openai-surface.md §2)."""
        seeded = self.seed is not None and self.temperature > 0.0
        return seeded or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def greedy(cls, max_tokens: int | None, *, ignore_eos: bool = False) -> SamplingOptions:
        """Temperature 0, no stop strings or ids, no seed: what the gateway's own calls (the
        start-up profile) and tests send."""
        return cls(
            max_tokens=max_tokens,
            temperature=0.0,
            top_p=1.0,
            seed=None,
            stop=(),
            stop_token_ids=(),
            ignore_eos=ignore_eos,
        )


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
    prompt: str | tuple[int, ...]
    """Text to tokenize, or token ids used as they are."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str | tuple[str, ...]
    """A string, or the texts of a list of {"type": "text"} parts, in order."""
    name: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatCompletionRequest(GenerationRequestFields):
    messages: tuple[ChatMessage, ...]


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """Defaults for fields the request leaves out (the model's generation_config may set them)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


def parse_completion_request(
    body: object,
    *,
    served_model_name: str,
    limits: RequestLimits,
    defaults: SamplingDefaults | None = None,
) -> CompletionRequest:
    obj, model = _parse_head(body, served_model_name, _UNSUPPORTED_COMPLETION, _COMPLETION_FIELDS)
    prompt = _parse_prompt(obj, limits)
    max_tokens = opt_int(obj, "max_tokens", minimum=1, maximum=limits.max_model_len)
    return CompletionRequest(
        prompt=prompt, **_parse_common(obj, model, max_tokens, limits, defaults)
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
    return ChatCompletionRequest(
        messages=messages, **_parse_common(obj, model, max_tokens, limits, defaults)
    )


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
) -> dict[str, Any]:
    """The :class:`GenerationRequestFields` of a request, as keyword arguments."""
    sampling = _parse_sampling(
        obj, max_tokens=max_tokens, limits=limits, defaults=defaults or SamplingDefaults()
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


def _parse_sampling(
    obj: dict[str, Any],
    *,
    max_tokens: int | None,
    limits: RequestLimits,
    defaults: SamplingDefaults,
) -> SamplingOptions:
    n = obj.get("n")
    if n is not None and (not is_int(n) or n != 1):
        raise invalid("n", f"Only n=1 is supported, got {n!r}.", "unsupported_parameter")
    temperature = opt_float(
        obj, "temperature", default=defaults.temperature, minimum=0, maximum=2, open_min=False
    )
    top_p = opt_float(obj, "top_p", default=defaults.top_p, minimum=0, maximum=1, open_min=True)
    seed = opt_int(obj, "seed", minimum=_INT64_MIN, maximum=_INT64_MAX)
    # vLLM's extensions, with its bounds: top_k -1 (or 0) means all tokens.
    top_k = opt_int(obj, "top_k", minimum=-1, maximum=2**31 - 1)
    min_tokens = opt_int(obj, "min_tokens", minimum=0, maximum=max_tokens or limits.max_model_len)
    if min_tokens and obj.get("stop"):
        # The engines look for stop strings only past min_tokens; the gateway's matcher (over
        # the whole output, across the split) does not yet: refused rather than inexact.
        raise invalid(
            "min_tokens",
            "'min_tokens' together with 'stop' strings is not supported yet.",
            "unsupported_parameter",
        )
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=_parse_stop(obj, limits),
        stop_token_ids=_parse_stop_token_ids(obj, limits),
        ignore_eos=opt_bool(obj, "ignore_eos", default=False),
        top_k=max(0, top_k if top_k is not None else defaults.top_k),
        min_p=opt_float(obj, "min_p", default=defaults.min_p, minimum=0, maximum=1, open_min=False),
        repetition_penalty=opt_float(
            obj,
            "repetition_penalty",
            default=defaults.repetition_penalty,
            minimum=0,
            maximum=2**31,
            open_min=True,
        ),
        min_tokens=min_tokens or 0,
        presence_penalty=_penalty(obj, "presence_penalty", defaults.presence_penalty),
        frequency_penalty=_penalty(obj, "frequency_penalty", defaults.frequency_penalty),
        logit_bias=_parse_logit_bias(obj, limits),
    )


def _penalty(obj: dict[str, Any], name: str, default: float) -> float:
    return opt_float(obj, name, default=default, minimum=-2.0, maximum=2.0, open_min=False)


MAX_LOGIT_BIAS_ENTRIES = 1024
"""Tokens one request may bias: a bound on what the gateway passes to the engines (OpenAI
documents none; vLLM's server has none)."""


def _parse_logit_bias(obj: dict[str, Any], limits: RequestLimits) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token ids (as strings, or integers) to a bias; each bias clamped to
    [-100, 100] as vLLM's server does."""
    value = obj.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise invalid("logit_bias", "'logit_bias' must be an object of token ids to numbers.")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise invalid(
            "logit_bias",
            f"'logit_bias' may bias at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(value)}.",
        )
    biases: dict[int, float] = {}
    for key, bias in value.items():
        token = key.strip() if isinstance(key, str) else ""
        if not token.isdecimal() or not token.isascii():
            raise invalid("logit_bias", f"'logit_bias' keys must be token ids, got {key!r}.")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
            raise invalid(
                "logit_bias", f"'logit_bias' values must be numbers, got {bias!r} for {key}."
            )
        biases[int(token)] = min(100.0, max(-100.0, float(bias)))
    check_in_vocabulary(list(biases), limits.vocab_size, "logit_bias")
    return tuple(sorted(biases.items()))


def _parse_stop(obj: dict[str, Any], limits: RequestLimits) -> tuple[str, ...]:
    value = obj.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", "'stop' must be a string or a list of strings.")
    if len(stops) > limits.max_stop_strings:
        raise invalid(
            "stop",
            f"'stop' may hold at most {limits.max_stop_strings} strings, got {len(stops)}.",
        )
    if any(s == "" for s in stops):
        raise invalid("stop", "'stop' strings must not be empty.")
    longest = max((len(s) for s in stops), default=0)
    if longest > limits.max_stop_chars:
        raise invalid(
            "stop",
            f"'stop' strings may be at most {limits.max_stop_chars} characters long, "
            f"got one of {longest}.",
        )
    return tuple(dict.fromkeys(stops))


def _parse_stop_token_ids(obj: dict[str, Any], limits: RequestLimits) -> tuple[int, ...]:
    value = obj.get("stop_token_ids")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(is_int(t) for t in value):
        raise invalid("stop_token_ids", "'stop_token_ids' must be a list of integers.")
    check_in_vocabulary(value, limits.vocab_size, "stop_token_ids")
    return tuple(value)


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


def _parse_prompt(obj: dict[str, Any], limits: RequestLimits) -> str | tuple[int, ...]:
    if "prompt" not in obj or obj["prompt"] is None:
        raise invalid(
            "prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter"
        )
    prompt = obj["prompt"]
    # A batch of exactly one prompt is the same request as that prompt.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt", "'prompt' must not be empty.")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise invalid(
            "prompt",
            "'prompt' must be a non-empty string or a non-empty list of token ids.",
        )
    if all(isinstance(p, str | list) for p in prompt):
        raise invalid(
            "prompt",
            f"Batched prompts ({len(prompt)} prompts) are not supported yet; send one per request.",
            "unsupported_parameter",
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
    if raw.get("tool_calls") or raw.get("function_call"):
        raise invalid(
            f"{where}.tool_calls", "Tool calls are not supported by this server.", "unsupported"
        )
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid(f"{where}.name", f"'{where}.name' must be a string.")
    content = raw.get("content")
    if content is None:
        if role != "assistant":
            raise invalid(f"{where}.content", f"'{where}.content' is required for role {role}.")
        content = ""
    if isinstance(content, str):
        return ChatMessage(role=role, content=content, name=name)
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
    return ChatMessage(role=role, content=tuple(texts), name=name)
