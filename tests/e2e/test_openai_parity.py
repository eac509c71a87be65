"""docs/openai-parity.md, row by row, through the official `openai` SDK against `strata serve`
(real prefill and decode engines, the tiny model): each served field is accepted and honoured
(its effect is checked, not only a 200), each refused one is a 400 naming it. Exactness against
one engine is tests/e2e/test_disaggregated.py's and test_openai_surface.py's."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.e2e.conftest import StrataServer

CHAT = [{"role": "user", "content": "Name a color and a number."}]
PROMPT = "the capital of france is paris and the river"
Row = tuple[str, str, dict[str, Any], Callable[[Any], object]]


def _text(answer: Any) -> str:
    choice = answer.choices[0]
    return choice.text if hasattr(choice, "text") else choice.message.content or ""


SERVED: list[Row] = [
    (
        "completions",
        "completions",
        {"prompt": PROMPT, "max_tokens": 5},
        lambda a: a.usage.completion_tokens <= 5 and _text(a),
    ),
    ("chat", "chat", {"messages": CHAT, "max_tokens": 5}, lambda a: _text(a) is not None),
    (
        "max_completion_tokens",
        "chat",
        {"messages": CHAT, "max_completion_tokens": 3},
        lambda a: a.usage.completion_tokens <= 3,
    ),
    (
        "ignore_eos",
        "completions",
        {"prompt": PROMPT, "max_tokens": 20, "extra_body": {"ignore_eos": True}},
        lambda a: a.usage.completion_tokens == 20,
    ),
    (
        "stop",
        "completions",
        {"prompt": PROMPT, "max_tokens": 30, "stop": ["e"], "extra_body": {"ignore_eos": True}},
        lambda a: "e" not in _text(a),
    ),
    (
        "seed",
        "completions",
        {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 5},
        lambda a: None,
    ),
    (
        "sampling extensions",
        "completions",
        {
            "prompt": PROMPT,
            "max_tokens": 8,
            "extra_body": {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 4},
        },
        lambda a: a.usage.completion_tokens >= 4,
    ),
    (
        "penalties and bias",
        "chat",
        {
            "messages": CHAT,
            "max_tokens": 8,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "logit_bias": {"7": 5},
        },
        lambda a: None,
    ),
    (
        "completions logprobs",
        "completions",
        {"prompt": PROMPT, "max_tokens": 4, "logprobs": 2},
        lambda a: len(a.choices[0].logprobs.tokens) == a.usage.completion_tokens,
    ),
    (
        "chat logprobs",
        "chat",
        {"messages": CHAT, "max_tokens": 4, "logprobs": True, "top_logprobs": 3},
        lambda a: all(len(c.top_logprobs) == 3 for c in a.choices[0].logprobs.content),
    ),
    (
        "n",
        "chat",
        {"messages": CHAT, "max_tokens": 4, "n": 3},
        lambda a: [c.index for c in a.choices] == [0, 1, 2],
    ),
    (
        "json_object",
        "chat",
        {
            "messages": CHAT,
            "max_tokens": 64,
            "response_format": {"type": "json_object"},
        },
        # The grammar's first character (64 tokens of a gibberish model may not close it).
        lambda a: _text(a).startswith("{"),
    ),
    (
        "json_schema",
        "chat",
        {
            "messages": CHAT,
            "max_tokens": 320,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "c",
                    "schema": {
                        "type": "object",
                        "properties": {"color": {"enum": ["red", "blue"]}},
                        "required": ["color"],
                        "additionalProperties": False,
                    },
                },
            },
        },
        lambda a: json.loads(_text(a))["color"] in ("red", "blue"),
    ),
    (
        "structured choice",
        "completions",
        {
            "prompt": PROMPT,
            "max_tokens": 8,
            "extra_body": {"structured_outputs": {"choice": ["yes", "no"]}},
        },
        lambda a: _text(a) in ("yes", "no"),
    ),
    (
        "structured regex",
        "completions",
        {
            "prompt": PROMPT,
            "max_tokens": 8,
            "extra_body": {"structured_outputs": {"regex": "[0-9]{3}"}},
        },
        lambda a: re.fullmatch("[0-9]{3}", _text(a)),
    ),
    (
        "tools named",
        "chat",
        {
            "messages": CHAT,
            "max_tokens": 320,
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "pick",
                        "parameters": {
                            "type": "object",
                            "properties": {"n": {"enum": [1, 2]}},
                            "required": ["n"],
                            "additionalProperties": False,
                        },
                    },
                }
            ],
            "tool_choice": {"type": "function", "function": {"name": "pick"}},
        },
        lambda a: json.loads(a.choices[0].message.tool_calls[0].function.arguments)["n"] in (1, 2),
    ),
    (
        "echo",
        "completions",
        {"prompt": PROMPT, "max_tokens": 3, "echo": True},
        lambda a: _text(a).startswith(PROMPT),
    ),
    (
        "batched prompts",
        "completions",
        {"prompt": [PROMPT, "a second prompt"], "max_tokens": 3},
        lambda a: [c.index for c in a.choices] == [0, 1],
    ),
    (
        "return_token_ids",
        "completions",
        {"prompt": PROMPT, "max_tokens": 3, "extra_body": {"return_token_ids": True}},
        lambda a: len(a.choices[0].token_ids) == a.usage.completion_tokens,
    ),
    (
        "cache_salt and metadata",
        "chat",
        {"messages": CHAT, "max_tokens": 3, "user": "u", "extra_body": {"cache_salt": "tenant-x"}},
        lambda a: None,
    ),
]

REFUSED: list[tuple[str, str, dict[str, Any], str]] = [
    ("best_of", "completions", {"prompt": PROMPT, "extra_body": {"best_of": 2}}, "best_of"),
    ("suffix", "completions", {"prompt": PROMPT, "suffix": "x"}, "suffix"),
    (
        "tool_choice auto",
        "chat",
        {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
        "tool_choice",
    ),
    ("echo with logprobs", "completions", {"prompt": PROMPT, "echo": True, "logprobs": 1}, "echo"),
    (
        "functions",
        "chat",
        {"messages": CHAT, "extra_body": {"functions": [{"name": "f"}]}},
        "functions",
    ),
    ("unknown field", "chat", {"messages": CHAT, "extra_body": {"frobnicate": 1}}, "frobnicate"),
    (
        "beam search",
        "chat",
        {"messages": CHAT, "extra_body": {"use_beam_search": True}},
        "use_beam_search",
    ),
    ("audio", "chat", {"messages": CHAT, "extra_body": {"modalities": ["audio"]}}, "modalities"),
    (
        "prompt logprobs",
        "completions",
        {"prompt": PROMPT, "extra_body": {"prompt_logprobs": 1}},
        "prompt_logprobs",
    ),
    (
        "structural tag",
        "chat",
        {"messages": CHAT, "extra_body": {"structured_outputs": {"structural_tag": "{}"}}},
        "structured_outputs",
    ),
]


def _client(server: StrataServer) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _create(server: StrataServer, endpoint: str, kwargs: dict[str, Any]) -> Any:
    client = _client(server)
    api = client.completions if endpoint == "completions" else client.chat.completions
    return api.create(model=server.model, **kwargs)


@pytest.mark.parametrize(("row", "endpoint", "kwargs", "check"), SERVED, ids=[r[0] for r in SERVED])
def test_served_rows_are_honoured(
    tiny_server: StrataServer,
    row: str,
    endpoint: str,
    kwargs: dict[str, Any],
    check: Callable[[Any], object],
) -> None:
    answer = _create(tiny_server, endpoint, kwargs)
    assert check(answer) is not False, (row, answer)
    stream = _create(tiny_server, endpoint, {**kwargs, "stream": True})
    assert list(stream), row  # the same request streams


@pytest.mark.parametrize(
    ("row", "endpoint", "kwargs", "param"), REFUSED, ids=[r[0] for r in REFUSED]
)
def test_refused_rows_are_400_naming_the_field(
    tiny_server: StrataServer, row: str, endpoint: str, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _create(tiny_server, endpoint, kwargs)
    assert info.value.body["param"] == param, row  # type: ignore[index]


def test_vllm_routes(tiny_server: StrataServer) -> None:
    client = _client(tiny_server)
    tokens = client.post(
        "/../tokenize", cast_to=dict, body={"model": tiny_server.model, "prompt": PROMPT}
    )
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = client.post(
        "/../detokenize",
        cast_to=dict,
        body={"model": tiny_server.model, "tokens": tokens["tokens"]},
    )
    assert PROMPT in text["prompt"]
    assert client.get("/../version", cast_to=dict)["version"]
