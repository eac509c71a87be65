"""response_format and structured_outputs into one StructuredOutput: exact results, and 400s
naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.api.fields import OpenAIError
from controlplane.api.structured import MAX_CHOICES, StructuredOutput, parse_structured

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
SCHEMA_TEXT = '{"type":"object","properties":{"ok":{"type":"boolean"}},"required":["ok"]}'


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutput("json_object", True)),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
                }
            },
            StructuredOutput("json", SCHEMA_TEXT),
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            StructuredOutput("json", "{}"),
        ),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutput("json", SCHEMA_TEXT)),
        ({"structured_outputs": {"json": SCHEMA_TEXT}}, StructuredOutput("json", SCHEMA_TEXT)),
        ({"structured_outputs": {"regex": "[a-z]+"}}, StructuredOutput("regex", "[a-z]+")),
        (
            {"structured_outputs": {"choice": ["yes", "no"]}},
            StructuredOutput("choice", ("yes", "no")),
        ),
        (
            {"structured_outputs": {"grammar": 'root ::= "a"'}},
            StructuredOutput("grammar", 'root ::= "a"'),
        ),
    ],
)
def test_constraints(body: dict[str, Any], expected: StructuredOutput | None) -> None:
    assert parse_structured(body) == expected


def _nested(depth: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_deep_or_huge_schemas_are_400_not_500() -> None:
    for body in (
        {"structured_outputs": {"json": "[" * 5000 + "]" * 5000}},
        {"structured_outputs": {"json": _nested(200)}},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": _nested(990)},
            }
        },
    ):
        with pytest.raises(OpenAIError) as info:
            parse_structured(body)
        assert info.value.status == 400
    assert parse_structured({"structured_outputs": {"json": _nested(20)}}) is not None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "response_format",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_object", "extra": 1}}, "response_format"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
        ({"structured_outputs": {"json": "[1]"}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"structured_outputs": {"choice": ["a"] * (MAX_CHOICES + 1)}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a" * 70000}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": ""}}, "structured_outputs"),
        ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs"),
        ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "mystery": 1}}, "structured_outputs"),
        # vLLM's engine takes these from its configuration, never from a request.
        (
            {"structured_outputs": {"regex": "a", "disable_any_whitespace": True}},
            "structured_outputs",
        ),
        (
            {"structured_outputs": {"json_object": True, "disable_additional_properties": True}},
            "structured_outputs",
        ),
        (
            {"structured_outputs": {"regex": "a", "disable_any_whitespace": "no"}},
            "structured_outputs",
        ),
    ],
)
def test_bad_constraints_are_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_structured(body)
    assert (info.value.status, info.value.param) == (400, param)
