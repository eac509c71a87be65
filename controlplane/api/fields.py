"""The fields of a JSON request: OpenAI's error, and the checks every request parser uses
(each rejection an `OpenAIError` naming the field: status 400, OpenAI's type and code)."""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "OpenAIError",
    "check_in_vocabulary",
    "invalid",
    "is_int",
    "is_off_value",
    "opt_bool",
    "opt_float",
    "opt_int",
    "parse_model",
    "reject_unsupported",
    "require_object",
    "type_name",
]


class OpenAIError(Exception):
    """A request the server answers with an OpenAI-shaped error body and a non-2xx status."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(param: str, message: str, code: str | None = None) -> OpenAIError:
    return OpenAIError(message, param=param, code=code)


def type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def require_object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise OpenAIError(
            f"The request body must be a JSON object, got {type_name(body)}.",
            code="invalid_body",
        )
    return body


def parse_model(obj: dict[str, Any], served_model_name: str) -> str:
    model = obj.get("model")
    if model is None:
        raise invalid("model", "Missing required parameter: 'model'.", "missing_required_parameter")
    if not isinstance(model, str):
        raise invalid("model", f"'model' must be a string, got {type_name(model)}.")
    if model != served_model_name:
        raise OpenAIError(
            f"The model '{model}' does not exist. This server serves '{served_model_name}'.",
            status=404,
            param="model",
            code="model_not_found",
        )
    return model


def reject_unsupported(obj: dict[str, Any], table: dict[str, tuple[object, ...]]) -> None:
    for name, off_values in table.items():
        if name in obj and not any(is_off_value(obj[name], off) for off in off_values):
            raise invalid(
                name,
                f"'{name}' is not supported by this server (only its default value is accepted).",
                "unsupported_parameter",
            )


def is_off_value(value: object, off: object) -> bool:
    # Booleans only match booleans: 0 must not pass as False, nor True as 1.
    if isinstance(value, bool) or isinstance(off, bool):
        return value is off
    return value == off


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def opt_int(obj: dict[str, Any], name: str, *, minimum: int, maximum: int) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not is_int(value):
        raise invalid(name, f"'{name}' must be an integer, got {type_name(value)}.")
    if not minimum <= value <= maximum:
        raise invalid(name, f"'{name}' must be between {minimum} and {maximum}, got {value}.")
    return int(value)


def opt_float(
    obj: dict[str, Any],
    name: str,
    *,
    default: float,
    minimum: float,
    maximum: float,
    open_min: bool,
) -> float:
    value = obj.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name, f"'{name}' must be a number, got {type_name(value)}.")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
    too_low = number <= minimum if open_min else number < minimum
    if not math.isfinite(number) or too_low or number > maximum:
        bracket = "(" if open_min else "["
        raise invalid(name, f"'{name}' must be in {bracket}{minimum:g}, {maximum:g}], got {value}.")
    return number


def opt_bool(obj: dict[str, Any], name: str, *, default: bool) -> bool:
    value = obj.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be a boolean, got {type_name(value)}.")
    return value


def check_in_vocabulary(token_ids: list[int], vocab_size: int, param: str) -> None:
    """Every id of ``token_ids`` (integers already) is a token of the vocabulary."""
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise invalid(
                param,
                f"Token id {token_id} in '{param}' is out of the vocabulary (size {vocab_size}).",
            )
