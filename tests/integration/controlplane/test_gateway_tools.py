"""Tool calling through the gateway (scripted workers "generate" the JSON a grammar would
force): the SDK gets well-formed ``tool_calls``, streaming and not; the tools reach the chat
template; tool results go back into the conversation."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from controlplane.text.tokenizer import ModelTokenizer
from tests.integration.controlplane.conftest import SERVED_MODEL_NAME, Stack

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def _script(stack: Stack, model_tokenizer: ModelTokenizer, text: str) -> None:
    stack.script.token_ids = model_tokenizer.encode_rendered_chat(text)


def _collect(stream: Any) -> tuple[dict[int, dict[str, Any]], str | None, str]:
    """The calls a stream's deltas add up to (by index), its finish_reason, its content."""
    calls: dict[int, dict[str, Any]] = {}
    finish, content = None, ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
    return calls, finish, content


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_a_named_tool_choice_is_a_call_of_that_function(
    stack: Stack, model_tokenizer: ModelTokenizer, stream: bool
) -> None:
    arguments = '{"city":"Paris"}'
    _script(stack, model_tokenizer, arguments)
    kwargs: dict[str, Any] = dict(
        model=SERVED_MODEL_NAME,
        messages=USER,
        max_tokens=40,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    if stream:
        calls, finish, content = _collect(
            stack.client().chat.completions.create(stream=True, **kwargs)
        )
        assert content == ""
        ((index, call),) = calls.items()
        assert (index, call["name"], call["arguments"]) == (0, "get_weather", arguments)
        assert call["id"].startswith("chatcmpl-tool-")
    else:
        choice = stack.client().chat.completions.create(**kwargs).choices[0]
        finish = choice.finish_reason
        assert choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert (call.type, call.function.name, call.function.arguments) == (
            "function",
            "get_weather",
            arguments,
        )
    assert finish == "stop"  # OpenAI's for a named call
    (decode,) = stack.decode.decode_requests
    # The grammar is the function's parameters; the decode engine samples every token.
    assert json.loads(decode.sampling.structured.json_schema) == WEATHER["function"]["parameters"]
    assert len(decode.prompt_token_ids) == len(stack.prefill.prefill_requests[0].prompt_token_ids)


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_required_tool_choice_calls_tools(
    stack: Stack, model_tokenizer: ModelTokenizer, stream: bool
) -> None:
    made = [
        {"name": "get_weather", "parameters": {"city": "Paris"}},
        {"name": "get_time", "parameters": {}},
    ]
    _script(stack, model_tokenizer, json.dumps(made))
    kwargs: dict[str, Any] = dict(
        model=SERVED_MODEL_NAME, messages=USER, max_tokens=200, tools=[WEATHER, TIME],
        tool_choice="required",
    )  # fmt: skip
    if stream:
        calls, finish, _ = _collect(stack.client().chat.completions.create(stream=True, **kwargs))
        got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    else:
        choice = stack.client().chat.completions.create(**kwargs).choices[0]
        finish = choice.finish_reason
        got = [
            (c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls or []
        ]
    assert got == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert finish == "tool_calls"
    (decode,) = stack.decode.decode_requests
    schema = json.loads(decode.sampling.structured.json_schema)
    assert schema["type"] == "array" and schema["minItems"] == 1
    names = [item["properties"]["name"]["enum"] for item in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]


def test_tool_results_go_back_into_the_conversation(
    stack: Stack, model_tokenizer: ModelTokenizer
) -> None:
    """An assistant message with tool_calls and the tool's answer: the template renders both
    (the arguments as an object), tool_choice "none" answers in text."""
    conversation = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call-1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21 C"},
    ]
    answer = stack.client().chat.completions.create(
        model=SERVED_MODEL_NAME,
        messages=conversation,  # type: ignore[arg-type]
        max_tokens=10,
        tools=[WEATHER],
        tool_choice="none",
    )
    assert answer.choices[0].message.content == "Hello world!"
    assert answer.choices[0].message.tool_calls is None
    prompt = model_tokenizer.decode(list(stack.prefill.prefill_requests[0].prompt_token_ids))
    assert "sunny, 21 C" in prompt


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [WEATHER]}, "tool_choice"),  # "auto" by default: not served
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "none"},
            "tools",
        ),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "none"}, "tools"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(
    stack: Stack, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        stack.client().chat.completions.create(
            model=SERVED_MODEL_NAME, messages=USER, extra_body=fields
        )
    assert info.value.body is not None and info.value.body["param"] == param  # type: ignore[index]
