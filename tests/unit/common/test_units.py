"""Exact tests of the one size parser and the one duration parser (strata_common.units)."""

from __future__ import annotations

import pytest

from strata_common.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        (4096, 4096),
        ("4KiB", 4096),
        ("2GiB", 2 * 1024**3),
        ("512 MiB", 512 * 1024**2),
        ("1GB", 10**9),
        ("1.5KiB", 1536),
        ("64kib", 65536),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "2 potatoes", "-1", "1.3B", "2GiB2", True])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", 30.0),
        ("30", 30.0),
        (2.5, 2.5),
        ("250ms", 0.25),
        (".5s", 0.5),
        ("100us", 1e-4),
        ("5m", 300.0),
        ("24h", 86400.0),
        ("1d", 86400.0),
    ],
)
def test_parse_duration(text: str | float, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "s", "5 years", "-3s", -1.0, float("nan"), True])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(30.0, "30s"), (0.25, "250ms"), (0.0, "0s"), (600.0, "10m"), (86400.0, "24h"), (90.0, "90s")],
)
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [(2 << 30, "2GiB"), (4096, "4KiB"), (1000, "1000"), (0, "0"), (3 << 40, "3TiB")],
)
def test_format_size_round_trips(nbytes: int, text: str) -> None:
    assert format_size(nbytes) == text
    assert parse_size(text) == nbytes


@pytest.mark.parametrize(
    "seconds",
    [1e6, 1234567.0, 100000.5, 0.0001234567, 1e-7, 86400.0 * 400, 0.001, 59.999, 3600.5, 1e-3 / 3],
)
def test_format_duration_is_exact_for_any_value(seconds: float) -> None:
    text = format_duration(seconds)
    assert "e" not in text
    assert parse_duration(text) == seconds
