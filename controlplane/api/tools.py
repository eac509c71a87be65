"""Tool calling on chat: the request's ``tools`` and ``tool_choice``, and the answer's
``tool_calls``.

A call is forced by a grammar, as vLLM's server forces it: ``tool_choice`` naming a function
constrains the output to that function's ``parameters`` schema (the arguments; finish_reason
"stop"), ``"required"`` to a JSON array of ``{"name", "parameters"}`` objects, one of the tools
each (at least one; one at most when ``parallel_tool_calls`` is false; finish_reason
"tool_calls"). The constraint is a structured output (controlplane/api/structured.py): the
decode engine samples every token under it. ``"none"`` renders the tools
into the prompt (the chat template's ``tools``) and lets the model answer in text. ``"auto"``
— the model decides, its output parsed by a model-specific tool parser (vLLM's
``--enable-auto-tool-choice --tool-call-parser``) — is not served: refused with 400 naming
``tool_choice``, as vLLM's server refuses it without those flags; it is the default when
``tools`` are given without a choice.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Final

from controlplane.api.fields import invalid, opt_bool, type_name
from controlplane.api.structured import MAX_CONSTRAINT_CHARS, StructuredOutput, schema_text

__all__ = [
    "MAX_TOOLS",
    "ToolCalls",
    "ToolFunction",
    "ToolsRequest",
    "parse_tool_list",
    "parse_tools",
]

MAX_TOOLS: Final = 128
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ANY_OBJECT: Final = '{"type":"object","properties":{}}'


@dataclass(frozen=True, slots=True)
class ToolFunction:
    name: str
    description: str | None
    parameters: str | None
    """Its arguments' JSON schema, as JSON text (None: not given, any object)."""
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class ToolsRequest:
    """A chat request's tools and how the answer must use them."""

    tools: tuple[ToolFunction, ...]
    choice: str
    """"none", "required", or "named" (``named`` is the function)."""
    named: str | None = None
    parallel: bool = True

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as chat templates take them: as vLLM's server hands them over (its
        models' dump: name, description and parameters, None when not given; strict when
        given), so that the prompt is the one vLLM's server renders."""
        out = []
        for tool in self.tools:
            function: dict[str, Any] = {
                "name": tool.name,
                "description": tool.description,
                "parameters": json.loads(tool.parameters) if tool.parameters else None,
            }
            if tool.strict is not None:
                function["strict"] = tool.strict
            out.append({"type": "function", "function": function})
        return out

    def constraint(self) -> StructuredOutput | None:
        """The grammar the answer is sampled under (None: free text)."""
        if self.choice == "named":
            (tool,) = (t for t in self.tools if t.name == self.named)
            return StructuredOutput("json", _object_schema(tool.parameters))
        if self.choice == "required":
            # Each tool's "$defs" go to the top, where its "#/$defs/..." references look for
            # them (as vLLM's server builds this schema); one name defined two ways is a 400.
            defs: dict[str, Any] = {}
            calls = []
            for t in self.tools:
                parameters = json.loads(_object_schema(t.parameters))
                for name, definition in parameters.pop("$defs", {}).items():
                    if defs.setdefault(name, definition) != definition:
                        raise invalid("tools", f"The tools define '$defs/{name}' two ways.")
                calls.append(
                    {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "enum": [t.name]},
                            "parameters": parameters,
                        },
                        "required": ["name", "parameters"],
                    }
                )
            schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if not self.parallel:
                schema["maxItems"] = 1
            if defs:
                schema["$defs"] = defs
            text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
            if len(text) > MAX_CONSTRAINT_CHARS:
                raise invalid(
                    "tools", f"The tools' schemas exceed {MAX_CONSTRAINT_CHARS} characters."
                )
            return StructuredOutput("json", text)
        return None


def parse_tools(obj: dict[str, Any]) -> ToolsRequest | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat request (None: no tools
    and no choice that needs them)."""
    raw_tools = obj.get("tools")
    choice = obj.get("tool_choice")
    parallel = opt_bool(obj, "parallel_tool_calls", default=True)
    if raw_tools is None or raw_tools == []:
        if choice not in (None, "none"):
            raise invalid("tool_choice", "'tool_choice' needs 'tools'.")
        return None
    tools = parse_tool_list(raw_tools)
    if choice is None or choice == "auto":
        raise invalid(
            "tool_choice",
            "'tool_choice' \"auto\" (the default when 'tools' are given) is not supported by this "
            'server: name a function, or send "required" or "none".',
            "unsupported_parameter",
        )
    if choice in ("none", "required"):
        return ToolsRequest(tools, choice, parallel=parallel)
    if not isinstance(choice, dict) or choice.get("type") != "function":
        raise invalid(
            "tool_choice",
            '\'tool_choice\' must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}.',
        )
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not any(t.name == name for t in tools):
        raise invalid("tool_choice", f"'tool_choice' names {name!r}, which is not in 'tools'.")
    return ToolsRequest(tools, "named", named=name, parallel=parallel)


def parse_tool_list(raw_tools: object) -> tuple[ToolFunction, ...]:
    """A request's ``tools`` (a list of functions; chat, /tokenize)."""
    if not isinstance(raw_tools, list):
        raise invalid("tools", f"'tools' must be a list, got {type_name(raw_tools)}.")
    if len(raw_tools) > MAX_TOOLS:
        raise invalid("tools", f"'tools' may hold at most {MAX_TOOLS} tools.")
    tools = tuple(_parse_tool(i, t) for i, t in enumerate(raw_tools))
    if len({t.name for t in tools}) != len(tools):
        raise invalid("tools", "'tools' names a function twice.")
    if sum(len(t.parameters or "") for t in tools) > MAX_CONSTRAINT_CHARS:
        raise invalid("tools", f"The tools' schemas exceed {MAX_CONSTRAINT_CHARS} characters.")
    return tools


def _parse_tool(index: int, raw: object) -> ToolFunction:
    where = f"tools[{index}]"
    if not isinstance(raw, dict) or raw.get("type") != "function":
        raise invalid("tools", f"'{where}' must be an object of type 'function'.")
    function = raw.get("function")
    if not isinstance(function, dict):
        raise invalid("tools", f"'{where}.function' must be an object.")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise invalid(
            "tools", f"'{where}.function.name' must be 1-64 letters, digits, '_', '.' or '-'."
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid("tools", f"'{where}.function.description' must be a string.")
    parameters = function.get("parameters")
    text = None
    if isinstance(parameters, dict):
        text = schema_text(parameters, f"tools[{index}].function.parameters")
    elif parameters is not None:
        raise invalid("tools", f"'{where}.function.parameters' must be a JSON schema (an object).")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid("tools", f"'{where}.function.strict' must be a boolean.")
    return ToolFunction(name, description, text, strict)


class ToolCalls:
    """The ``tool_calls`` of one answer made under a forced call: for a body from the whole
    text, for a stream delta by delta."""

    __slots__ = ("_id", "_made", "_request", "_started", "_text")

    def __init__(self, request: ToolsRequest) -> None:
        self._request = request
        self._id = _new_id()
        self._started = False
        self._made = False
        self._text: list[str] = []

    @property
    def forced(self) -> bool:
        return self._request.choice in ("named", "required")

    def finish_reason(self, finish: str) -> str:
        """OpenAI's: "tool_calls" when "required" made calls (the answer ended, and parsed),
        else the generation's."""
        required = self._request.choice == "required"
        return "tool_calls" if required and self._made and finish == "stop" else finish

    def body(self, text: str) -> list[dict[str, Any]] | None:
        """The calls of the whole ``text`` (None: they do not parse, e.g. cut by max_tokens)."""
        if self._request.choice == "named":
            self._made = True
            return [self._call(self._id, self._request.named or "", text)]
        try:
            calls = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(calls, list):
            return None
        made = [
            self._call(
                f"chatcmpl-tool-{uuid.uuid4().hex}", str(c["name"]), json.dumps(c["parameters"])
            )
            for c in calls
            if isinstance(c, dict) and "name" in c and "parameters" in c
        ]
        self._made = bool(made)
        return made or None

    def stream(self, text: str, finished: bool) -> list[dict[str, Any]] | None:
        """The ``tool_calls`` delta for the next ``text`` (None: nothing to send yet). A named
        call streams its arguments as they come; "required" calls come whole at the end (their
        names are known only once the array parses)."""
        if self._request.choice == "named":
            delta: dict[str, Any] = {"index": 0, "function": {"arguments": text}}
            if not self._started:
                self._started = True
                delta |= {"id": self._id, "type": "function"}
                delta["function"] = {"name": self._request.named, "arguments": text}
            return [delta] if text or delta.get("id") else None
        self._text.append(text)
        if not finished:
            return None
        calls = self.body("".join(self._text))
        if not calls:
            return None
        return [{"index": i, **call} for i, call in enumerate(calls)]

    def leftover(self) -> str:
        """A streamed "required" answer that made no call (cut short: it does not parse): its
        text, sent as content at the end as a body would carry it."""
        return "" if self._made else "".join(self._text)

    @staticmethod
    def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
        return {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }


def _object_schema(parameters: str | None) -> str:
    """A function's parameters schema; none, or an empty one, is any object (vLLM's rule: the
    arguments are always an object)."""
    if not parameters or parameters in ("{}", "true"):
        return _ANY_OBJECT
    return parameters


def _new_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"
