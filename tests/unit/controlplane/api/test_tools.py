"""tools and tool_choice: what a forced call constrains the answer to, and the calls made of it."""

from __future__ import annotations

import json

import pytest

from controlplane.api.fields import OpenAIError
from controlplane.api.tools import ToolCalls, ToolsRequest, parse_tools

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}, "description": "d"},
}
TIME = {"type": "function", "function": {"name": "get_time"}}
NAMED = {"type": "function", "function": {"name": "get_time"}}


def test_no_tools_no_request() -> None:
    assert parse_tools({}) is None
    assert parse_tools({"tools": [], "tool_choice": "none"}) is None


def test_named_choice_is_the_function_s_parameters() -> None:
    tools = parse_tools({"tools": [WEATHER, TIME], "tool_choice": NAMED})
    assert tools is not None and (tools.choice, tools.named) == ("named", "get_time")
    constraint = tools.constraint()
    assert constraint is not None
    assert (constraint.kind, constraint.value) == ("json", '{"type":"object","properties":{}}')
    # As vLLM's server hands tools to the template: every field, None when not given.
    assert tools.template_tools() == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "d",
                "parameters": {"type": "object"},
            },
        },
        {
            "type": "function",
            "function": {"name": "get_time", "description": None, "parameters": None},
        },
    ]


@pytest.mark.parametrize("parallel", [True, False])
def test_required_is_an_array_of_calls(parallel: bool) -> None:
    body = {"tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": parallel}
    tools = parse_tools(body)
    assert tools is not None
    constraint = tools.constraint()
    assert constraint is not None
    schema = json.loads(str(constraint.value))
    assert (schema["minItems"], schema.get("maxItems")) == (1, None if parallel else 1)
    assert [i["properties"]["name"]["enum"] for i in schema["items"]["anyOf"]] == [
        ["get_weather"],
        ["get_time"],
    ]
    none = parse_tools({"tools": [WEATHER], "tool_choice": "none"})
    assert none is not None and none.constraint() is None


def test_calls_from_the_answer() -> None:
    named = ToolCalls(ToolsRequest((), "named", named="f"))
    (call,) = named.body('{"a": 1}') or []
    assert call["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert named.finish_reason("stop") == "stop"
    # Streamed: the name and id first, then the arguments as they come.
    first = named.stream('{"a"', finished=False)
    assert first is not None and first[0]["function"]["name"] == "f" and "id" in first[0]
    assert named.stream(": 1}", finished=True) == [{"index": 0, "function": {"arguments": ": 1}"}}]
    required = ToolCalls(ToolsRequest((), "required"))
    assert required.stream('[{"name": "g", ', finished=False) is None  # whole at the end
    made = required.stream('"parameters": {"x": 2}}]', finished=True)
    assert made is not None
    assert [(c["index"], c["function"]) for c in made] == [
        (0, {"name": "g", "arguments": '{"x": 2}'})
    ]
    assert required.finish_reason("stop") == "tool_calls"
    assert required.finish_reason("length") == "length"
    assert ToolCalls(ToolsRequest((), "required")).body('[{"name": "g"') is None  # cut short


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [WEATHER]}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": NAMED}, "tool_choice"),
        ({"tools": "x", "tool_choice": "none"}, "tools"),
        ({"tools": [{"type": "code"}], "tool_choice": "none"}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": ""}}], "tool_choice": "none"},
            "tools",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}],
                "tool_choice": "none",
            },
            "tools",
        ),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": "none", "parallel_tool_calls": "yes"},
            "parallel_tool_calls",
        ),
        ({"tools": [WEATHER] * 129, "tool_choice": "none"}, "tools"),
    ],
)
def test_bad_tools_are_400_naming_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_tools(body)
    assert (info.value.status, info.value.param) == (400, param)


def test_required_hoists_each_tool_s_defs_where_references_find_them() -> None:
    """Pydantic-made tools refer to "#/$defs/...": nested under items, they would not resolve."""
    loc = {"type": "object", "properties": {"city": {"type": "string"}}}
    tool = {
        "type": "function",
        "function": {
            "name": "go",
            "parameters": {
                "type": "object",
                "properties": {"to": {"$ref": "#/$defs/Loc"}},
                "$defs": {"Loc": loc},
            },
        },
    }
    tools = parse_tools({"tools": [tool, TIME], "tool_choice": "required"})
    assert tools is not None
    constraint = tools.constraint()
    assert constraint is not None
    schema = json.loads(str(constraint.value))
    assert schema["$defs"] == {"Loc": loc}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    other = json.loads(json.dumps(tool))
    other["function"]["name"] = "go2"
    other["function"]["parameters"]["$defs"]["Loc"] = {"type": "string"}  # the same name, redefined
    clash = parse_tools({"tools": [tool, other], "tool_choice": "required"})
    assert clash is not None
    with pytest.raises(OpenAIError) as info:
        clash.constraint()
    assert info.value.param == "tools"


def test_no_or_empty_parameters_are_any_object() -> None:
    empty = {"type": "function", "function": {"name": "f", "parameters": {}}}
    for tool in (empty, TIME):
        name = tool["function"]["name"]  # type: ignore[index]
        choice = {"type": "function", "function": {"name": name}}
        tools = parse_tools({"tools": [tool], "tool_choice": choice})
        assert tools is not None
        constraint = tools.constraint()
        assert constraint is not None
        assert json.loads(str(constraint.value)) == {"type": "object", "properties": {}}


def test_a_required_answer_cut_short_is_text_and_not_tool_calls() -> None:
    calls = ToolCalls(ToolsRequest((), "required"))
    assert calls.body('[{"name": "g", "param') is None
    assert calls.finish_reason("stop") == "stop"  # no call was made
    streamed = ToolCalls(ToolsRequest((), "required"))
    assert streamed.stream('[{"name": "g", ', finished=False) is None
    assert streamed.stream('"param', finished=True) is None
    assert streamed.leftover() == '[{"name": "g", "param'
    assert streamed.finish_reason("length") == "length"


def test_bad_schemas_in_tools_are_400() -> None:
    for parameters in ({"type": "object", "x": float("nan")}, _deep(100)):
        tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
        with pytest.raises(OpenAIError) as info:
            parse_tools({"tools": [tool], "tool_choice": "none"})
        assert info.value.param == "tools"
    with pytest.raises(OpenAIError):  # a name ending in a newline
        parse_tools(
            {"tools": [{"type": "function", "function": {"name": "f\n"}}], "tool_choice": "none"}
        )


def _deep(depth: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema
