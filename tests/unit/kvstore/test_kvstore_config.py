"""Exact tests of the node configuration and its parsers (kvstore.config)."""

from __future__ import annotations

import pytest

from kvstore.config import StoreNodeConfig, parse_duration, parse_size


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


@pytest.mark.parametrize("text", ["", "GiB", "2 potatoes", "-1", "1.3B", "2GiB2"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30s", 30.0), ("30", 30.0), (2.5, 2.5), ("250ms", 0.25), ("5m", 300.0), ("24h", 86400.0)],
)
def test_parse_duration(text: str | float, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "s", "5 years", "-3s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_from_cli_with_env_defaults_and_cli_override() -> None:
    env = {"STRATA_KVSTORE_ARENA_SIZE": "64MiB", "STRATA_KVSTORE_PORT": "7700"}
    config = StoreNodeConfig.from_cli(
        ["--port", "0", "--put-timeout", "5s", "--prefault", "false"], env=env
    )
    assert config == StoreNodeConfig(
        port=0, arena_size_bytes=64 * 1024**2, put_timeout_s=5.0, prefault=False
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--arena-size", "lots"],
        ["--arena-size", "10000"],  # not a multiple of the page size
        ["--page-size", "3000"],
        ["--port", "70000"],
        ["--put-timeout", "0s"],
        ["--arena-dir", "/nonexistent-dir"],
    ],
)
def test_from_cli_rejects_invalid(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        StoreNodeConfig.from_cli(argv, env={})
    assert excinfo.value.code == 2
    assert "error" in capsys.readouterr().err
