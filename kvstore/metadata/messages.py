"""Member info as protobuf (``strata.metadata.v1.MemberInfo``), both ways; used by the gRPC
service and its client alone.

Info maps names to JSON scalars; each travels as a typed ``InfoValue`` (a string, a signed 64-bit
integer, a double, a bool, or nothing set for None), so that what a member registered comes back
exactly -- ``pid`` stays an int, ``started_at`` a float -- and :meth:`MetadataStore.reap`'s
comparison of incarnations holds across the wire.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strata_proto import metadata_pb2

__all__ = ["info_from_proto", "info_to_proto"]

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def info_to_proto(info: Mapping[str, Any]) -> metadata_pb2.MemberInfo:
    """``info`` as a message; ValueError for a value that is not a JSON scalar."""
    message = metadata_pb2.MemberInfo()
    for name, value in info.items():
        if not isinstance(name, str):
            raise ValueError(f"member info names must be strings, got {name!r}")
        field = message.fields[name]
        if value is None:
            field.SetInParent()
        elif isinstance(value, bool):  # before int: bool is an int
            field.bool_value = value
        elif isinstance(value, int):
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise ValueError(f"member info {name!r}: {value} does not fit 64 bits")
            field.int_value = value
        elif isinstance(value, float):
            field.double_value = value
        elif isinstance(value, str):
            field.string_value = value
        else:
            raise ValueError(
                f"member info {name!r} is a {type(value).__name__}; values must be JSON scalars "
                "(str, int, float, bool or None)"
            )
    return message


def info_from_proto(message: metadata_pb2.MemberInfo) -> dict[str, Any]:
    """Inverse of :func:`info_to_proto`."""
    info: dict[str, Any] = {}
    for name, field in message.fields.items():
        kind = field.WhichOneof("value")
        info[name] = None if kind is None else getattr(field, kind)
    return info
