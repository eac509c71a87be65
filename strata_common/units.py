"""The one parser of byte sizes and of durations, for every config, CLI and environment value.

Sizes: ``4096``, ``"4KiB"``, ``"2GiB"`` (binary) or ``"1GB"``, ``"1.5G"`` (decimal).
Durations, in seconds: ``30``, ``"30s"``, ``"250ms"``, ``"100us"``, ``"5m"``, ``"24h"``, ``"1d"``.
Both raise ``ValueError`` with an example of what is accepted.
"""

from __future__ import annotations

import re
from decimal import Decimal

__all__ = ["format_duration", "format_size", "parse_duration", "parse_size"]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int) -> int:
    """Parse a byte size: ``4096``, ``"4KiB"``, ``"2GiB"``, ``"1.5GB"``; returns whole bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    match = _NUMBER_UNIT.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (examples: 4096, 64KiB, 2GiB, 1GB)")
    nbytes = float(match.group(1)) * _SIZE_UNITS[unit]
    if nbytes != int(nbytes):
        raise ValueError(f"size {value!r} is not a whole number of bytes")
    return int(nbytes)


def parse_duration(value: str | float) -> float:
    """Parse a duration in seconds: ``30``, ``"30s"``, ``"250ms"``, ``"5m"``, ``"24h"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _NUMBER_UNIT.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _DURATION_UNITS:
            raise ValueError(f"not a duration: {value!r} (examples: 30s, 250ms, 5m, 24h)")
        seconds = float(match.group(1)) * _DURATION_UNITS[unit]
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"duration must not be negative: {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``30.0`` → ``"30s"``, ``0.25`` → ``"250ms"``, ``86400`` → ``"24h"``: the inverse of
    :func:`parse_duration` — ``parse_duration(format_duration(x)) == x`` for every duration —,
    in the largest unit that keeps it short (up to hours), else in exact decimal seconds."""
    candidates = []
    if seconds and seconds < 1:
        candidates.append(f"{seconds * 1000:g}ms")
    candidates += [
        f"{seconds / factor:g}{unit}"
        for unit, factor in (("h", 3600), ("m", 60))
        if seconds >= factor and seconds % factor == 0
    ]
    candidates.append(f"{seconds:g}s")
    for text in candidates:
        if "e" not in text and parse_duration(text) == seconds:
            return text
    return f"{Decimal(repr(float(seconds))):f}s"


def format_size(nbytes: int) -> str:
    """``2147483648`` → ``"2GiB"``, ``4096`` → ``"4KiB"``, ``1000`` → ``"1000"``: the largest
    binary unit that divides it exactly; the inverse of :func:`parse_size`."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes and nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return str(nbytes)
