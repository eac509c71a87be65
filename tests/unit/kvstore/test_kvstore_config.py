"""Exact tests of the node configuration and its parsers (kvstore.server.config)."""

from __future__ import annotations

import pytest

from kvstore.server.config import StoreNodeConfig
from kvstore.server.lifecycle import deadlines_of


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
        ["--header-timeout", "0s"],
        ["--idle-timeout", "0s"],
        ["--max-connections", "0"],
        ["--max-pinned-fraction", "1.5"],
        ["--max-pinned-per-connection", "0.6"],  # more than the node-wide 0.5
        ["--max-pinned-per-connection", "0"],
        ["--arena-dir", "/nonexistent-dir"],
        ["--hint-timeout", "0s"],
    ],
)
def test_from_cli_rejects_invalid(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        StoreNodeConfig.from_cli(argv, env={})
    assert excinfo.value.code == 2
    assert "error" in capsys.readouterr().err


def test_the_hint_timeout_is_short_by_default_and_a_flag() -> None:
    assert StoreNodeConfig.from_cli([], env={}).hint_timeout_s == 0.25
    assert StoreNodeConfig.from_cli(["--hint-timeout", "80ms"], env={}).hint_timeout_s == 0.08
    env = {"STRATA_KVSTORE_HINT_TIMEOUT": "1s"}
    assert StoreNodeConfig.from_cli([], env=env).hint_timeout_s == 1.0


def test_metadata_port_serves_embedded_metadata_only() -> None:
    env = {"STRATA_KVSTORE_METADATA_PORT": "7601"}
    config = StoreNodeConfig.from_cli(["--metadata", "embedded"], env=env)
    assert (config.metadata, config.metadata_port) == ("embedded", 7601)
    assert StoreNodeConfig(metadata="embedded").metadata_port == 0  # any free port
    with pytest.raises(ValueError, match="metadata_port needs metadata 'embedded'"):
        StoreNodeConfig(metadata="redis://h:1/0", metadata_port=7601)
    with pytest.raises(ValueError, match="metadata_port must differ from port"):
        StoreNodeConfig(metadata="embedded", port=7600, metadata_port=7600)
    with pytest.raises(ValueError, match="metadata_port out of range: 65536"):
        StoreNodeConfig(metadata="embedded", metadata_port=65536)


def test_a_hung_writers_key_is_writable_again_within_30_s_by_default() -> None:
    # Issue 10: "writer killed between put start and commit: key writable again within 30 s".
    # A killed writer's connection closes at once; a hung one is dropped by the reaper.
    deadlines = deadlines_of(StoreNodeConfig())
    assert deadlines.put_timeout_s == 20.0
    assert deadlines.put_timeout_s + deadlines.reaper_period_s == 21.0


def test_limits_defaults_and_their_flags() -> None:
    config = StoreNodeConfig()
    assert (
        config.max_connections,
        config.header_timeout_s,
        config.idle_timeout_s,
        config.lease_timeout_s,
        config.max_pinned_fraction,
        config.max_pinned_per_connection,
    ) == (512, 10.0, 300.0, 30.0, 0.5, 0.25)
    env = {"STRATA_KVSTORE_MAX_CONNECTIONS": "64", "STRATA_KVSTORE_IDLE_TIMEOUT": "1m"}
    argv = ["--header-timeout", "250ms", "--max-pinned-fraction", "0.8"]
    argv += ["--max-pinned-per-connection", "0.1"]
    parsed = StoreNodeConfig.from_cli(argv, env=env)
    assert (
        parsed.max_connections,
        parsed.header_timeout_s,
        parsed.idle_timeout_s,
        parsed.max_pinned_fraction,
        parsed.max_pinned_per_connection,
    ) == (64, 0.25, 60.0, 0.8, 0.1)
    assert deadlines_of(parsed).reaper_period_s == 0.0625  # a quarter of the shortest


@pytest.mark.parametrize(
    ("soft", "hard", "set_to", "warned"),
    [
        (256, 4096, (640, 4096), False),  # raised to what 512 connections need
        (256, 300, (300, 300), True),  # raised as far as allowed, and said so
        (1024, 4096, None, False),  # enough already
    ],
)
def test_the_open_files_limit_is_raised_for_max_connections(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    soft: int,
    hard: int,
    set_to: tuple[int, int] | None,
    warned: bool,
) -> None:
    from kvstore.server import cli

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(cli.resource, "getrlimit", lambda _which: (soft, hard))
    monkeypatch.setattr(cli.resource, "setrlimit", lambda _which, limits: calls.append(limits))
    cli._raise_open_files_limit(512)
    assert calls == ([] if set_to is None else [set_to])
    assert ("open-files limit 300 is below" in caplog.text) is warned


def test_a_node_on_every_address_advertises_a_dialable_one() -> None:
    wildcard = {"host": "0.0.0.0", "insecure": True, "metadata": "redis://10.0.0.5:6379/0"}
    with pytest.raises(ValueError, match="give --advertise-address"):
        StoreNodeConfig(**wildcard)
    config = StoreNodeConfig(**wildcard, advertise_address="10.0.0.7")
    assert config.advertise_address == "10.0.0.7"
    for bad in ("0.0.0.0", "[::]", ""):
        with pytest.raises(ValueError, match="must be a dialable address"):
            StoreNodeConfig(**wildcard, advertise_address=bad)
    assert StoreNodeConfig(host="0.0.0.0", insecure=True).advertise_address is None  # standalone
