"""Structured output: OpenAI's ``response_format`` and vLLM's ``structured_outputs``, parsed into
one `StructuredOutput` (vLLM's StructuredOutputsParams, as the workers pass it to the engine).

- ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}`` (any JSON
  object), ``{"type": "json_schema", "json_schema": {"name", "schema", "strict",
  "description"}}`` (the schema);
- ``structured_outputs`` (vLLM's extension): exactly one of ``json`` (a schema: an object, or
  its JSON text), ``json_object``, ``regex``, ``choice`` (a list of strings), ``grammar``; the
  options ``disable_any_whitespace`` and ``disable_additional_properties`` only false (vLLM's
  engine takes them from its configuration, not from the request).

Given both, ``response_format``'s constraint replaces the other's and keeps its options, as
vLLM's server does. The engine compiles the constraint; one it cannot compile fails the request
there (INVALID_ARGUMENT from the worker: 400). Bounds: a constraint's text at most
`MAX_CONSTRAINT_CHARS`, at most `MAX_CHOICES` choices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Final

from controlplane.api.fields import invalid, type_name

__all__ = [
    "MAX_CHOICES",
    "MAX_CONSTRAINT_CHARS",
    "StructuredOutput",
    "parse_structured",
    "schema_text",
]

MAX_CONSTRAINT_CHARS: Final = 65536
"""The longest schema (as JSON text), regex or grammar a request may send: the engine compiles
it for every request (a cost the gateway bounds)."""
MAX_CHOICES: Final = 256
MAX_SCHEMA_DEPTH: Final = 64
"""Deepest nesting of a schema (grammar compilers recurse over it)."""

_KINDS: Final = ("json", "json_object", "regex", "choice", "grammar")
_OPTIONS: Final = ("disable_any_whitespace", "disable_additional_properties")
_UNSERVED: Final = ("whitespace_pattern", "structural_tag")


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """One constraint on the output: ``kind`` is "json" (``value``: the schema's JSON text),
    "json_object" (``value`` True), "regex" or "grammar" (the text), or "choice" (the strings)."""

    kind: str
    value: str | bool | tuple[str, ...]
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False


def parse_structured(obj: dict[str, Any]) -> StructuredOutput | None:
    """The request's constraint, from ``response_format`` and ``structured_outputs``."""
    base = _parse_structured_outputs(obj.get("structured_outputs"))
    override = _parse_response_format(obj.get("response_format"))
    if override is None:
        return base
    if base is None:
        return override
    return replace(base, kind=override.kind, value=override.value)


def _parse_response_format(value: object) -> StructuredOutput | None:
    param = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(param, f"'{param}' must be an object, got {type_name(value)}.")
    kind = value.get("type")
    unknown = sorted(set(value) - {"type", "json_schema"})
    if unknown:
        raise invalid(param, f"'{param}' has unknown fields: {unknown}.")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object", True)
    if kind != "json_schema":
        raise invalid(
            param,
            f"'{param}.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}.",
            "unsupported_parameter" if isinstance(kind, str) else None,
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid(param, f"'{param}.json_schema' must be an object.")
    if not isinstance(spec.get("name"), str):
        raise invalid(param, f"'{param}.json_schema.name' must be a string.")
    extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if extra:
        raise invalid(param, f"'{param}.json_schema' has unknown fields: {extra}.")
    schema = spec.get("schema", {})  # OpenAI: no schema is any object matching "{}"
    return StructuredOutput("json", schema_text(schema, f"{param}.json_schema.schema"))


def _parse_structured_outputs(value: object) -> StructuredOutput | None:
    param = "structured_outputs"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid(param, f"'{param}' must be an object, got {type_name(value)}.")
    unknown = sorted(set(value) - set(_KINDS) - set(_OPTIONS) - set(_UNSERVED))
    if unknown:
        raise invalid(param, f"'{param}' has unknown fields: {unknown}.")
    for name in _UNSERVED:
        if value.get(name) is not None:
            raise invalid(
                param, f"'{param}.{name}' is not supported by this server.", "unsupported_parameter"
            )
    given = [k for k in _KINDS if value.get(k) is not None and value.get(k) is not False]
    if len(given) != 1:
        raise invalid(param, f"'{param}' needs exactly one of {list(_KINDS)}, got {given}.")
    (kind,) = given
    raw = value[kind]
    options = {}
    for name in _OPTIONS:
        option = value.get(name, False)
        if not isinstance(option, bool):
            raise invalid(param, f"'{param}.{name}' must be a boolean.")
        if option:
            # vLLM's engine reads both from its own config (structured_outputs_config), never
            # from the request: its server accepts them and ignores them.
            raise invalid(
                param,
                f"'{param}.{name}' is not honoured per request by the engine (vLLM takes it "
                "from the engine's configuration), so it is refused.",
                "unsupported_parameter",
            )
        options[name] = option
    where = f"{param}.{kind}"
    parsed: str | bool | tuple[str, ...]
    if kind == "json":
        schema = raw
        if isinstance(raw, str):
            if len(raw) > MAX_CONSTRAINT_CHARS:
                raise invalid(param, f"'{where}' is longer than {MAX_CONSTRAINT_CHARS} characters.")
            try:
                schema = json.loads(raw)
            except (ValueError, RecursionError):
                raise invalid(param, f"'{where}' is not valid JSON.") from None
        parsed = schema_text(schema, where, raw)
    elif kind == "json_object":
        if raw is not True:
            raise invalid(param, f"'{where}' must be true.")
        parsed = True
    elif kind == "choice":
        if not isinstance(raw, list) or not raw or not all(isinstance(c, str) for c in raw):
            raise invalid(param, f"'{where}' must be a non-empty list of strings.")
        if len(raw) > MAX_CHOICES:
            raise invalid(param, f"'{where}' may hold at most {MAX_CHOICES} strings.")
        if sum(len(c) for c in raw) > MAX_CONSTRAINT_CHARS:
            raise invalid(param, f"'{where}' is longer than {MAX_CONSTRAINT_CHARS} characters.")
        parsed = tuple(raw)
    else:  # regex, grammar
        if not isinstance(raw, str) or not raw:
            raise invalid(param, f"'{where}' must be a non-empty string.")
        _check_length(raw, where, param)
        parsed = raw
    return StructuredOutput(kind, parsed, **options)


def schema_text(schema: object, where: str, raw: object = None) -> str:
    """A JSON schema (an object, or true) as the JSON text the engine compiles; 400 naming the
    field (``where``'s first part) for one that is not, nests too deep, holds NaN or infinities
    (not JSON) or is too long."""
    param = where.split(".")[0].split("[")[0]
    if not isinstance(schema, dict) and schema is not True:
        shown = type_name(raw if raw is not None else schema)
        raise invalid(param, f"'{where}' must be a JSON schema (an object), got {shown}.")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise invalid(param, f"'{where}' nests deeper than {MAX_SCHEMA_DEPTH} levels.")
    try:
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise invalid(param, f"'{where}' holds a number JSON cannot write (NaN).") from None
    _check_length(text, where, param)
    return text


def _depth(value: object) -> int:
    """How deep ``value`` nests (stops counting past `MAX_SCHEMA_DEPTH`: no recursion limit)."""
    depth, level = 0, [value]
    while level and depth <= MAX_SCHEMA_DEPTH:
        depth += 1
        nested: list[object] = []
        for item in level:
            if isinstance(item, dict):
                nested += item.values()
            elif isinstance(item, list):
                nested += item
        level = nested
    return depth - 1 if not level else depth


def _check_length(text: str, where: str, param: str) -> None:
    if len(text) > MAX_CONSTRAINT_CHARS:
        raise invalid(param, f"'{where}' is longer than {MAX_CONSTRAINT_CHARS} characters.")
