"""Tool calling through Strata on real prefill and decode engines (issue "A drop-in OpenAI
endpoint", acceptance 4): the tiny model with a ChatML template that renders tools
(tests/e2e/data/tool_chat_template.jinja, the Hermes convention); the SDK receives well-formed
``tool_calls``, streaming and not, and a named call is, token for token, one engine's answer
under the same grammar and prompt."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai import OpenAI

from tests.e2e.conftest import StrataServer, run_reference, start_server

TEMPLATE = Path(__file__).parent / "data" / "tool_chat_template.jinja"
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "days": {"enum": [1, 2, 3]}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The forecast for a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
MESSAGES = [{"role": "user", "content": "What will the weather be in Paris tomorrow?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
MAX_TOKENS = 320  # JSON grammars allow whitespace runs: room for a gibberish model


@pytest.fixture(scope="module")
def tool_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-tools")
    for item in tiny_model_dir.iterdir():
        if item.is_file():
            shutil.copy(item, out / item.name)
    shutil.copy(TEMPLATE, out / "chat_template.jinja")
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # chat_template.jinja is the one
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def server(tool_model_dir: Path) -> Iterator[StrataServer]:
    server = start_server(tool_model_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tool_model_dir: Path) -> list[dict[str, Any]]:
    named = {"structured_outputs": {"json": WEATHER_PARAMETERS}}
    # The tools as vLLM's server hands them to the template (its models' dump: every field).
    dumped = [
        {"type": "function", "function": {"description": None, "parameters": None, **t["function"]}}
        for t in TOOLS
    ]
    dumped = [
        {
            "type": "function",
            "function": {k: d["function"][k] for k in ("name", "description", "parameters")},
        }
        for d in dumped
    ]
    return run_reference(
        tool_model_dir,
        [
            {
                "kind": "chat",
                "messages": MESSAGES,
                "tools": dumped,
                "max_tokens": MAX_TOKENS,
                "sampling": named,
            }
        ],
    )


def _client(server: StrataServer) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _stream_calls(stream: Any) -> tuple[list[tuple[str, str]], str | None]:
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                name, arguments = calls.setdefault(delta.index, ["", ""])
                if delta.function is not None:
                    calls[delta.index] = [
                        name + (delta.function.name or ""),
                        arguments + (delta.function.arguments or ""),
                    ]
    return [(n, a) for _, (n, a) in sorted(calls.items())], finish


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
# "required" is the integration tests' (tests/integration/controlplane/test_gateway_tools.py):
# with the tiny model, vLLM's JSON grammar lets it pad an array with whitespace until max_tokens.
@pytest.mark.parametrize("choice", ["named"])
def test_tool_calls_are_well_formed(server: StrataServer, choice: str, stream: bool) -> None:
    kwargs: dict[str, Any] = dict(
        model=server.model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=NAMED if choice == "named" else "required",
        parallel_tool_calls=False,
        max_tokens=MAX_TOKENS,
        temperature=0.8,
        seed=3,
    )
    if stream:
        calls, finish = _stream_calls(
            _client(server).chat.completions.create(stream=True, **kwargs)
        )
    else:
        answer = _client(server).chat.completions.create(**kwargs).choices[0]
        finish = answer.finish_reason
        calls = [(c.function.name, c.function.arguments) for c in answer.message.tool_calls or []]
    assert finish == ("stop" if choice == "named" else "tool_calls")
    assert calls, "no tool call"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), schemas[name])
    if choice == "named":
        assert [name for name, _ in calls] == ["get_weather"]


def test_the_tools_are_in_the_prompt(server: StrataServer) -> None:
    """The template rendered the tools: the prompt is longer by their text."""
    client = _client(server)
    plain = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=1)
    with_tools = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=1, tools=TOOLS, tool_choice="none"
    )
    assert plain.usage is not None and with_tools.usage is not None
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50


def test_a_named_call_equals_one_engine_s(
    server: StrataServer, reference: list[dict[str, Any]]
) -> None:
    (ref,) = reference
    answer = _client(server).chat.completions.create(
        model=server.model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice=NAMED,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = answer.choices[0]
    assert list(getattr(choice, "token_ids", None) or []) == ref["token_ids"]
    (call,) = choice.message.tool_calls or []
    assert call.function.arguments == ref["text"]
