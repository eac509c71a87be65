"""The sampling fields of completions and chat requests, parsed and bounded.

`parse_sampling` turns a request's sampling fields into `SamplingOptions`, each one checked
(OpenAIError 400 naming the field), left-out ones taken from `SamplingDefaults` (the model's
generation_config.json, as vLLM's `--generation-config auto`). How each one stays exact across
the prefill/decode split: docs/design/openai-surface.md.

Bounds on what a request may ask for (`RequestLimits`, set from the gateway's HTTP config): at most
`max_stop_strings` stop strings (4, as OpenAI allows) of at most `max_stop_chars` characters each
(256: every stop string is matched against each generated piece and up to its length minus one
characters of output are held back, so both the per-token cost and the streaming delay grow with
them; real stop strings are delimiters of a few characters); logprobs of at most `MAX_LOGPROBS`
top tokens; a `logit_bias` of at most `MAX_LOGIT_BIAS_ENTRIES` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from controlplane.api.fields import (
    check_in_vocabulary,
    invalid,
    is_int,
    opt_bool,
    opt_float,
    opt_int,
)
from controlplane.api.structured import StructuredOutput, parse_structured

__all__ = [
    "MAX_LOGPROBS",
    "MAX_N",
    "RequestLimits",
    "SamplingDefaults",
    "SamplingOptions",
    "parse_sampling",
]

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
DEFAULT_MAX_STOP_STRINGS: Final = 4
"""OpenAI's limit on `stop`."""
DEFAULT_MAX_STOP_CHARS: Final = 256
"""Longest stop string, in characters (module docstring)."""
DEFAULT_MAX_CHARS_PER_TOKEN: Final = 32
"""Bound on the characters one token stands for (`request_checks.check_prompt_chars`): English
averages about 4, code 3, CJK 1 to 2; a text denser than 32 is runs of whitespace or repeats."""
MAX_N: Final = 16
"""Most answers (``n``) one request may ask for: each is a decode sequence of its own."""
MAX_LOGPROBS: Final = 20
"""Top tokens a request may ask logprobs of: OpenAI's bound, and vLLM's ``--max-logprobs``
default, which the workers run with."""


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
    logprobs: int | None = None
    """Return each token's logprob and this many top tokens' (chat's ``top_logprobs``,
    completions' ``logprobs``); None = no logprobs."""
    n: int = 1
    """Answers to generate for the prompt (choices); sample i draws with ``seed + i``."""
    structured: StructuredOutput | None = None
    """A constraint on the output (``response_format``, ``structured_outputs``)."""

    @property
    def decode_samples_first(self) -> bool:
        """Whether the decode engine samples the first token itself (the prefill's is dropped):
        sampling whose state runs from the first token on, which one engine would carry — a
        seeded generator's position, the output's token counts of presence and frequency
        penalties (a first token handed over would be in the decode engine's prompt, not its
        output); each of ``n`` > 1 samples, all decoded from the one prefill's blocks; a
        grammar's state (docs/design/openai-surface.md §2)."""
        seeded = self.seed is not None and self.temperature > 0.0
        penalized = self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        return seeded or penalized or self.n > 1 or self.structured is not None

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
class SamplingDefaults:
    """Defaults for fields the request leaves out (the model's generation_config may set them)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


def parse_sampling(
    obj: dict[str, Any],
    *,
    max_tokens: int | None,
    limits: RequestLimits,
    defaults: SamplingDefaults,
    logprobs: int | None,
) -> SamplingOptions:
    n = opt_int(obj, "n", minimum=1, maximum=MAX_N) or 1
    temperature = opt_float(
        obj, "temperature", default=defaults.temperature, minimum=0, maximum=2, open_min=False
    )
    top_p = opt_float(obj, "top_p", default=defaults.top_p, minimum=0, maximum=1, open_min=True)
    # Sample i of n draws with seed + i (vLLM's children's seeds): each must be an int64 too.
    seed = opt_int(obj, "seed", minimum=_INT64_MIN, maximum=_INT64_MAX - (n - 1))
    # vLLM's extensions, with its bounds: top_k -1 (or 0) means all tokens.
    top_k = opt_int(obj, "top_k", minimum=-1, maximum=2**31 - 1)
    min_tokens = opt_int(obj, "min_tokens", minimum=0, maximum=max_tokens or limits.max_model_len)
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
        logprobs=logprobs,
        n=n,
        structured=parse_structured(obj),
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
        if not token.isdecimal() or not token.isascii() or len(token) > 12:
            raise invalid("logit_bias", f"'logit_bias' keys must be token ids, got {key[:20]!r}.")
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise invalid("logit_bias", f"'logit_bias' values must be numbers, got one for {key}.")
        if isinstance(bias, float) and math.isnan(bias):
            raise invalid("logit_bias", f"'logit_bias' values must be numbers, got NaN for {key}.")
        # Clamped as vLLM's server does; an integer beyond any float compares fine as an int.
        biases[int(token)] = float(min(100, max(-100, bias)))
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
