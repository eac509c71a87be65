"""Request validation: every rejection's status, param and code; the parsed values otherwise."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.api.openai_protocol import (
    ChatMessage,
    OpenAIError,
    parse_chat_completion_request,
    parse_completion_request,
)
from controlplane.api.request_checks import check_context_length
from controlplane.api.sampling import RequestLimits, SamplingDefaults

M = "served"
LIMITS = RequestLimits(max_model_len=1000, vocab_size=500)
USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": M, "messages": USER, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": M, "prompt": "hi", **fields}


# (id, body, status, param, code)
BAD_CHAT = [
    ("not-an-object", [chat()], 400, None, "invalid_body"),
    ("null-body", None, 400, None, "invalid_body"),
    ("missing-model", {"messages": USER}, 400, "model", "missing_required_parameter"),
    ("model-wrong-type", chat(model=["x"]), 400, "model", None),
    ("unknown-model", chat(model="other"), 404, "model", "model_not_found"),
    ("missing-messages", {"model": M}, 400, "messages", "missing_required_parameter"),
    ("messages-not-list", chat(messages="hi"), 400, "messages", None),
    ("messages-empty", chat(messages=[]), 400, "messages", None),
    ("message-not-object", chat(messages=["hi"]), 400, "messages[0]", None),
    ("role-missing", chat(messages=[{"content": "x"}]), 400, "messages[0].role", None),
    ("role-unknown", chat(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role",
     None),
    ("role-tool-without-call-id", chat(messages=[{"role": "tool", "content": "x"}]), 400,
     "messages[0].tool_call_id", None),
    ("role-function", chat(messages=[{"role": "function", "content": "x"}]), 400,
     "messages[0].role", None),
    ("content-missing-for-user", chat(messages=[{"role": "user"}]), 400, "messages[0].content",
     None),
    ("content-number", chat(messages=[{"role": "user", "content": 1}]), 400,
     "messages[0].content", None),
    ("part-not-object", chat(messages=[{"role": "user", "content": ["x"]}]), 400,
     "messages[0].content[0]", None),
    ("part-image", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages[0].content[0].type", "unsupported_content_type"),
    ("part-text-missing", chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400,
     "messages[0].content[0].text", None),
    ("name-not-string", chat(messages=[{"role": "user", "content": "x", "name": 3}]), 400,
     "messages[0].name", None),
    ("tool-calls-without-function",
     chat(messages=[{"role": "assistant", "tool_calls": [{"id": "1"}]}]), 400,
     "messages[0].tool_calls", None),
    ("tool-calls-on-user", chat(messages=[{"role": "user", "content": "x", "tool_calls": [{}]}]),
     400, "messages[0].tool_calls", None),
    ("max-tokens-zero", chat(max_tokens=0), 400, "max_tokens", None),
    ("max-tokens-negative", chat(max_tokens=-1), 400, "max_tokens", None),
    ("max-tokens-over-window", chat(max_tokens=1001), 400, "max_tokens", None),
    ("max-tokens-bool", chat(max_tokens=True), 400, "max_tokens", None),
    ("max-tokens-fraction", chat(max_tokens=2.5), 400, "max_tokens", None),
    ("max-tokens-infinite", chat(max_tokens=float("inf")), 400, "max_tokens", None),
    ("max-completion-tokens-zero", chat(max_completion_tokens=0), 400, "max_completion_tokens",
     None),
    ("temperature-negative", chat(temperature=-0.1), 400, "temperature", None),
    ("temperature-over-2", chat(temperature=2.01), 400, "temperature", None),
    ("temperature-string", chat(temperature="hot"), 400, "temperature", None),
    ("temperature-nan", chat(temperature=float("nan")), 400, "temperature", None),
    ("top-p-zero", chat(top_p=0), 400, "top_p", None),
    ("top-p-over-1", chat(top_p=1.5), 400, "top_p", None),
    ("n-zero", chat(n=0), 400, "n", None),
    ("n-too-many", chat(n=17), 400, "n", None),
    ("n-text", chat(n="2"), 400, "n", None),
    ("seed-overflows-with-n", chat(n=3, seed=2**63 - 2), 400, "seed", None),
    ("seed-string", chat(seed="1"), 400, "seed", None),
    ("seed-over-int64", chat(seed=2**63), 400, "seed", None),
    ("stop-number", chat(stop=3), 400, "stop", None),
    ("stop-empty-string", chat(stop=["a", ""]), 400, "stop", None),
    ("stop-five-strings", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("stop-too-long", chat(stop=["x" * 257]), 400, "stop", None),
    ("stop-one-too-long", chat(stop="a" + "é" * 256), 400, "stop", None),
    ("stop-token-out-of-vocab", chat(stop_token_ids=[500]), 400, "stop_token_ids", None),
    ("stop-token-ids-not-list", chat(stop_token_ids=5), 400, "stop_token_ids", None),
    ("stream-not-bool", chat(stream="yes"), 400, "stream", None),
    ("stream-options-without-stream", chat(stream_options={"include_usage": True}), 400,
     "stream_options", None),
    ("stream-options-not-object", chat(stream=True, stream_options=[]), 400, "stream_options",
     None),
    ("include-usage-not-bool", chat(stream=True, stream_options={"include_usage": 1}), 400,
     "stream_options.include_usage", None),
    ("ignore-eos-not-bool", chat(ignore_eos=1), 400, "ignore_eos", None),
    ("cache-salt-empty", chat(cache_salt=""), 400, "cache_salt", None),
    ("cache-salt-too-long", chat(cache_salt="x" * 257), 400, "cache_salt", None),
    ("return-token-ids-not-bool", chat(return_token_ids="yes"), 400, "return_token_ids", None),
    ("logprobs-not-bool", chat(logprobs=1), 400, "logprobs", None),
    ("top-logprobs-alone", chat(top_logprobs=2), 400, "top_logprobs", None),
    ("top-logprobs-too-many", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    ("tools-auto", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "tool_choice", "unsupported_parameter"),
    ("tools-malformed", chat(tools=[{"type": "function"}], tool_choice="none"), 400, "tools", None),
    ("json-mode-unknown-type", chat(response_format={"type": "yaml"}), 400, "response_format",
     "unsupported_parameter"),
    ("presence-penalty-too-high", chat(presence_penalty=2.5), 400, "presence_penalty", None),
    ("frequency-penalty-text", chat(frequency_penalty="x"), 400, "frequency_penalty", None),
    ("logit-bias-list", chat(logit_bias=[1, 2]), 400, "logit_bias", None),
    ("logit-bias-word-key", chat(logit_bias={"hello": 1}), 400, "logit_bias", None),
    ("logit-bias-negative-key", chat(logit_bias={"-1": 1}), 400, "logit_bias", None),
    ("logit-bias-out-of-vocab", chat(logit_bias={"1000000": 1}), 400, "logit_bias", None),
    ("logit-bias-text-value", chat(logit_bias={"5": "up"}), 400, "logit_bias", None),
    ("logit-bias-too-many", chat(logit_bias={str(i): 1 for i in range(1025)}), 400,
     "logit_bias", None),
]  # fmt: skip

BAD_COMPLETION = [
    ("missing-prompt", {"model": M}, 400, "prompt", "missing_required_parameter"),
    ("prompt-empty-string", completion(prompt=""), 400, "prompt", None),
    ("prompt-empty-list", completion(prompt=[]), 400, "prompt", None),
    ("prompt-number", completion(prompt=7), 400, "prompt", None),
    ("prompt-batch-too-big", completion(prompt=["a"] * 65), 400, "prompt", None),
    ("prompt-batch-empty-item", completion(prompt=["a", ""]), 400, "prompt", None),
    ("prompt-batch-bad-ids", completion(prompt=[[1], [-2]]), 400, "prompt", None),
    ("echo-with-logprobs", completion(echo=True, logprobs=1), 400, "echo", "unsupported_parameter"),
    ("prompt-mixed", completion(prompt=[1, "a"]), 400, "prompt", None),
    ("prompt-token-negative", completion(prompt=[1, -1]), 400, "prompt", None),
    ("prompt-token-out-of-vocab", completion(prompt=[500]), 400, "prompt", None),
    ("prompt-token-bool", completion(prompt=[True]), 400, "prompt", None),
    ("echo-not-bool", completion(echo="yes"), 400, "echo", None),
    ("logprobs-bool", completion(logprobs=True), 400, "logprobs", None),
    ("logprobs-too-many", completion(logprobs=21), 400, "logprobs", None),
    ("best-of", completion(best_of=2), 400, "best_of", "unsupported_parameter"),
    ("suffix", completion(suffix="x"), 400, "suffix", "unsupported_parameter"),
    ("max-tokens-zero", completion(max_tokens=0), 400, "max_tokens", None),
    ("unknown-model", completion(model="x"), 404, "model", "model_not_found"),
]  # fmt: skip


def _assert_rejected(exc: OpenAIError, status: int, param: str | None, code: str | None) -> None:
    assert (exc.status, exc.param, exc.code) == (status, param, code)
    assert exc.type == "invalid_request_error"
    assert exc.to_dict() == {
        "error": {"message": exc.message, "type": exc.type, "param": param, "code": code}
    }
    assert exc.message


@pytest.mark.parametrize(
    ("body", "status", "param", "code"), [pytest.param(*c[1:], id=c[0]) for c in BAD_CHAT]
)
def test_bad_chat_request(body: Any, status: int, param: str | None, code: str | None) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_chat_completion_request(body, served_model_name=M, limits=LIMITS)
    _assert_rejected(info.value, status, param, code)


@pytest.mark.parametrize(
    ("body", "status", "param", "code"), [pytest.param(*c[1:], id=c[0]) for c in BAD_COMPLETION]
)
def test_bad_completion_request(
    body: Any, status: int, param: str | None, code: str | None
) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_completion_request(body, served_model_name=M, limits=LIMITS)
    _assert_rejected(info.value, status, param, code)


def test_chat_defaults() -> None:
    request = parse_chat_completion_request(chat(), served_model_name=M, limits=LIMITS)
    assert request.messages == (ChatMessage("user", "hi", None),)
    s = request.sampling
    assert s.max_tokens is None  # fill the window
    assert (s.temperature, s.top_p, s.seed, s.stop, s.stop_token_ids) == (1.0, 1.0, None, (), ())
    assert not s.ignore_eos
    assert (request.stream, request.include_usage, request.cache_salt) == (False, False, "")
    assert not request.return_token_ids


def test_chat_fields() -> None:
    body = chat(
        messages=[
            {"role": "developer", "content": "be kind", "name": "ops"},
            {"role": "user", "content": [{"type": "text", "text": t} for t in ("a", "b")]},
            {"role": "assistant", "content": None},
        ],
        max_tokens=5,
        max_completion_tokens=7,
        temperature=0,
        top_p=0.5,
        seed=-3,
        stop="x",
        stop_token_ids=[2],
        ignore_eos=True,
        stream=True,
        stream_options={"include_usage": True},
        cache_salt="tenant-a",
        return_token_ids=True,
        n=1,
        user="someone",
        logprobs=False,
        tools=None,
        metadata={"a": "1"},
    )  # fmt: skip
    request = parse_chat_completion_request(body, served_model_name=M, limits=LIMITS)
    assert request.messages == (
        ChatMessage("developer", "be kind", "ops"),
        ChatMessage("user", ("a", "b"), None),
        ChatMessage("assistant", "", None),
    )
    s = request.sampling
    assert s.max_tokens == 7  # max_completion_tokens wins over the legacy max_tokens
    assert (s.temperature, s.top_p, s.seed, s.stop, s.stop_token_ids) == (
        0.0,
        0.5,
        -3,
        ("x",),
        (2,),
    )
    assert s.ignore_eos
    assert (request.stream, request.include_usage, request.cache_salt) == (True, True, "tenant-a")
    assert request.return_token_ids


def test_completion_defaults_and_prompt_forms() -> None:
    request = parse_completion_request(completion(), served_model_name=M, limits=LIMITS)
    assert (request.prompts, request.echo) == (("hi",), False)
    assert request.sampling.max_tokens is None  # not given: 16 at the context check
    forms = [
        ([1, 2], ((1, 2),)),
        ([[3, 4]], ((3, 4),)),
        (["one"], ("one",)),
        (["one", "two"], ("one", "two")),  # a batch: one generation each
        ([[3], [4, 5]], ((3,), (4, 5))),
        (["one", [4]], ("one", (4,))),
    ]
    for prompt, expected in forms:
        parsed = parse_completion_request(
            completion(prompt=prompt), served_model_name=M, limits=LIMITS
        )
        assert parsed.prompts == expected
    stops = parse_completion_request(
        completion(stop=["a", "b", "a"], max_tokens=3.0), served_model_name=M, limits=LIMITS
    ).sampling
    assert stops.stop == ("a", "b")
    assert stops.max_tokens == 3


def test_generation_config_defaults_apply_only_when_unset() -> None:
    defaults = SamplingDefaults(temperature=0.6, top_p=0.9)
    unset = parse_chat_completion_request(
        chat(), served_model_name=M, limits=LIMITS, defaults=defaults
    )
    assert (unset.sampling.temperature, unset.sampling.top_p) == (0.6, 0.9)
    explicit = parse_chat_completion_request(
        chat(temperature=1.0, top_p=1.0), served_model_name=M, limits=LIMITS, defaults=defaults
    )
    assert (explicit.sampling.temperature, explicit.sampling.top_p) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("num_prompt", "max_tokens", "default", "expected"),
    [
        (10, None, None, 90),  # chat: the rest of the window
        (10, None, 16, 16),  # completions: 16 ...
        (95, None, 16, 5),  # ... or what is left of the window
        (10, 90, 16, 90),
        (10, 1, None, 1),
        (99, None, None, 1),
    ],
)
def test_context_length_fits(
    num_prompt: int, max_tokens: int | None, default: int | None, expected: int
) -> None:
    got = check_context_length(
        num_prompt, max_tokens, 100, param="prompt", default_max_tokens=default
    )
    assert got == expected


@pytest.mark.parametrize(
    ("num_prompt", "max_tokens", "param"),
    [(100, None, "prompt"), (150, 1, "prompt"), (10, 91, "max_tokens"), (99, 2, "max_tokens")],
)
def test_context_length_exceeded(num_prompt: int, max_tokens: int | None, param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        check_context_length(num_prompt, max_tokens, 100, param="prompt")
    assert (info.value.status, info.value.param, info.value.code) == (
        400,
        param,
        "context_length_exceeded",
    )
    assert info.value.message.startswith("This model's maximum context length is 100 tokens.")


def test_stop_strings_at_their_limits_are_accepted() -> None:
    stops = ["a" * 256, "b", "c", "é" * 256]  # characters, not bytes: "é" * 256 is 512 bytes
    parsed = parse_chat_completion_request(chat(stop=stops), served_model_name=M, limits=LIMITS)
    assert parsed.sampling.stop == tuple(stops)
    empty = parse_chat_completion_request(chat(stop=[]), served_model_name=M, limits=LIMITS)
    assert empty.sampling.stop == ()
    tight = RequestLimits(max_model_len=1000, vocab_size=500, max_stop_strings=1, max_stop_chars=3)
    with pytest.raises(OpenAIError, match="at most 1 strings, got 2"):
        parse_chat_completion_request(chat(stop=["a", "b"]), served_model_name=M, limits=tight)
    with pytest.raises(OpenAIError, match="at most 3 characters long, got one of 4"):
        parse_chat_completion_request(chat(stop="abcd"), served_model_name=M, limits=tight)


def test_vllm_sampling_extensions_are_parsed_not_ignored() -> None:
    plain = parse_completion_request(completion(), served_model_name=M, limits=LIMITS).sampling
    assert (plain.top_k, plain.min_p, plain.repetition_penalty, plain.min_tokens) == (0, 0, 1, 0)
    body = completion(top_k=40, min_p=0.1, repetition_penalty=1.3, min_tokens=5, max_tokens=8)
    s = parse_completion_request(body, served_model_name=M, limits=LIMITS).sampling
    assert (s.top_k, s.min_p, s.repetition_penalty, s.min_tokens) == (40, 0.1, 1.3, 5)
    assert (plain.presence_penalty, plain.frequency_penalty, plain.logit_bias) == (0, 0, ())
    assert not plain.decode_samples_first
    body = completion(presence_penalty=-2, frequency_penalty=1.5, logit_bias={"9": 150, "3": -0.5})
    s = parse_completion_request(body, served_model_name=M, limits=LIMITS).sampling
    # vLLM's server clamps a bias to [-100, 100]; ids as sent (strings), sorted.
    assert (s.presence_penalty, s.frequency_penalty, s.logit_bias) == (
        -2,
        1.5,
        ((3, -0.5), (9, 100)),
    )
    # Penalties count the output's tokens: the decode engine samples the first one too.
    assert s.decode_samples_first
    biased = parse_completion_request(
        completion(logit_bias={"3": 5}), served_model_name=M, limits=LIMITS
    )
    assert not biased.sampling.decode_samples_first  # a bias has no state: both engines apply it
    # vLLM's "all tokens" is -1 (or 0).
    all_tokens = parse_chat_completion_request(chat(top_k=-1), served_model_name=M, limits=LIMITS)
    assert all_tokens.sampling.top_k == 0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": "high"}, "repetition_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),  # more than it may generate
    ],
)
def test_bad_sampling_extensions_are_400_naming_the_field(
    fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_completion_request(completion(**fields), served_model_name=M, limits=LIMITS)
    _assert_rejected(info.value, 400, param, None)


def test_generation_config_defaults_of_the_extensions() -> None:
    defaults = SamplingDefaults(top_k=20, min_p=0.05, repetition_penalty=1.1)
    unset = parse_chat_completion_request(
        chat(), served_model_name=M, limits=LIMITS, defaults=defaults
    ).sampling
    assert (unset.top_k, unset.min_p, unset.repetition_penalty) == (20, 0.05, 1.1)
    explicit = parse_chat_completion_request(
        chat(top_k=-1, min_p=0, repetition_penalty=1), served_model_name=M, limits=LIMITS,
        defaults=defaults,
    ).sampling  # fmt: skip
    assert (explicit.top_k, explicit.min_p, explicit.repetition_penalty) == (0, 0, 1)


@pytest.mark.parametrize(
    ("parse", "field", "value"),
    [
        (parse_chat_completion_request, "unknown_future_field", {"a": 1}),
        (parse_chat_completion_request, "guided_json", {"type": "object"}),
        (parse_chat_completion_request, "chat_template", "{{ x }}"),
        (parse_chat_completion_request, "reasoning_effort", "low"),
        (parse_chat_completion_request, "skip_special_tokens", False),  # not its default
        (parse_completion_request, "use_beam_search", True),
        (parse_completion_request, "skip_special_tokens", False),
        (parse_completion_request, "include_stop_str_in_output", True),
        (parse_completion_request, "allowed_token_ids", [1, 2]),
        (parse_completion_request, "prompt_logprobs", 1),
        (parse_completion_request, "metadata", {"a": "1"}),  # chat's only
        (parse_completion_request, "truncate_prompt_tokens", 10),
    ],
)
def test_a_field_that_would_be_ignored_is_refused_naming_it(
    parse: Any, field: str, value: object
) -> None:
    body = (chat if parse is parse_chat_completion_request else completion)(**{field: value})
    with pytest.raises(OpenAIError) as info:
        parse(body, served_model_name=M, limits=LIMITS)
    _assert_rejected(info.value, 400, field, "unsupported_parameter")
    assert f"'{field}'" in info.value.message


def test_vllm_and_openai_defaults_written_out_are_accepted() -> None:
    """Clients that spell out vLLM's defaults or OpenAI's metadata are served."""
    body = chat(
        skip_special_tokens=True, spaces_between_special_tokens=True, echo=False,
        include_stop_str_in_output=False, add_generation_prompt=True, priority=0,
        use_beam_search=False, length_penalty=1.0, truncate_prompt_tokens=None,
        parallel_tool_calls=True, prompt_cache_key="k", safety_identifier="s", stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": False},
    )  # fmt: skip
    parse_chat_completion_request(body, served_model_name=M, limits=LIMITS)
    parse_completion_request(
        completion(logprobs=None, add_special_tokens=True, best_of=1), served_model_name=M,
        limits=LIMITS,
    )  # fmt: skip


@pytest.mark.parametrize(
    "fields",
    [
        {"logit_bias": {"9" * 5000: 1}},
        {"presence_penalty": 10**400},
        {"frequency_penalty": -(10**400)},
        {"temperature": 10**400},
    ],
)
def test_huge_numbers_are_400_not_500(fields: dict[str, Any]) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_completion_request(completion(**fields), served_model_name=M, limits=LIMITS)
    assert (info.value.status, info.value.param) == (400, next(iter(fields)))


def test_a_huge_bias_is_clamped_as_vllm_does() -> None:
    body = completion(logit_bias={"5": 10**400, "6": -(10**400)})
    parsed = parse_completion_request(body, served_model_name=M, limits=LIMITS)
    assert parsed.sampling.logit_bias == ((5, 100.0), (6, -100.0))


def test_n_samples() -> None:
    one = parse_completion_request(completion(), served_model_name=M, limits=LIMITS).sampling
    assert (one.n, one.decode_samples_first) == (1, False)
    three = parse_chat_completion_request(chat(n=3), served_model_name=M, limits=LIMITS).sampling
    # Each sample's first token is its own: the decode engines sample every token.
    assert (three.n, three.decode_samples_first) == (3, True)
    top = parse_chat_completion_request(
        chat(n=16, seed=2**63 - 16), served_model_name=M, limits=LIMITS
    )
    assert top.sampling.seed == 2**63 - 16  # the last sample's seed + 15 still an int64


def test_structured_output_is_parsed_on_both_endpoints() -> None:
    fmt = {"type": "json_object"}
    c = parse_completion_request(
        completion(response_format=fmt), served_model_name=M, limits=LIMITS
    )
    assert c.sampling.structured is not None and c.sampling.structured.kind == "json_object"
    assert c.sampling.decode_samples_first  # the grammar starts at the first token
    body = chat(structured_outputs={"choice": ["a", "b"]})
    ch = parse_chat_completion_request(body, served_model_name=M, limits=LIMITS)
    assert ch.sampling.structured is not None and ch.sampling.structured.value == ("a", "b")


def test_logprobs_fields() -> None:
    def completions(**fields: Any) -> int | None:
        body = completion(**fields)
        return parse_completion_request(body, served_model_name=M, limits=LIMITS).sampling.logprobs

    def chats(**fields: Any) -> int | None:
        body = chat(**fields)
        return parse_chat_completion_request(
            body, served_model_name=M, limits=LIMITS
        ).sampling.logprobs

    # Completions' logprobs is the top count, 0 the sampled token's logprob alone.
    assert (completions(), completions(logprobs=None), completions(logprobs=0)) == (None, None, 0)
    assert completions(logprobs=20) == 20
    # Chat's is a switch, top_logprobs the count.
    assert (chats(), chats(logprobs=False), chats(logprobs=True)) == (None, None, 0)
    assert chats(logprobs=True, top_logprobs=5) == 5
    assert chats(logprobs=False, top_logprobs=0) is None
    # Logprobs have no sampling state: the prefill's first token is kept.
    body = completion(logprobs=3, temperature=0.5)
    assert not parse_completion_request(
        body, served_model_name=M, limits=LIMITS
    ).sampling.decode_samples_first


def test_refusals_of_what_is_not_exact_yet_name_the_field() -> None:
    both = completion(min_tokens=2, stop=["\n"])  # served: the matcher waits for min_tokens
    assert (
        parse_completion_request(both, served_model_name=M, limits=LIMITS).sampling.min_tokens == 2
    )
    with pytest.raises(OpenAIError) as info:
        parse_chat_completion_request(
            chat(stream=True, stream_options={"continuous_usage_stats": True}),
            served_model_name=M,
            limits=LIMITS,
        )
    _assert_rejected(
        info.value, 400, "stream_options.continuous_usage_stats", "unsupported_parameter"
    )
