"""Exact tests of the node configuration and its parsers (kvstore.server.config)."""

from __future__ import annotations

import pytest

from kvstore.server.config import StoreNodeConfig
from kvstore.server.lifecycle import reaper_period_s


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
    timeout = StoreNodeConfig().put_timeout_s
    assert timeout == 20.0
    assert timeout + reaper_period_s(timeout) == 21.0
    assert reaper_period_s(0.5) == 0.125
