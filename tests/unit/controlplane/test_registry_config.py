"""The registry's gateway settings: --registry, --drain-timeout, --stall-floor, --stall-factor."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.config import ConfigError, GatewayConfig, RegistryConfig
from controlplane.instances.store import LocalRegistryStore, open_registry_store


def argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model-dir", str(tmp_path), "--prefill", "h:1", "--decode", "h:2", *extra]


def test_defaults_keep_the_registry_in_this_process(tmp_path: Path) -> None:
    config = GatewayConfig.from_argv(argv(tmp_path))
    assert (config.registry.url, config.registry.drain_timeout_s) == ("", 60.0)
    assert isinstance(open_registry_store(config.registry.url), LocalRegistryStore)


def test_flags(tmp_path: Path) -> None:
    config = GatewayConfig.from_argv(
        argv(tmp_path, "--registry", "redis://10.0.0.5:6379/2", "--drain-timeout", "90s")
    )
    assert (config.registry.url, config.registry.drain_timeout_s) == (
        "redis://10.0.0.5:6379/2",
        90.0,
    )


def test_stall_bound_settings(tmp_path: Path) -> None:
    default = GatewayConfig.from_argv(argv(tmp_path)).registry
    assert (default.stall_floor_s, default.stall_factor) == (15.0, 4.0)
    config = GatewayConfig.from_argv(argv(tmp_path, "--stall-floor", "3s", "--stall-factor", "2.5"))
    assert (config.registry.stall_floor_s, config.registry.stall_factor) == (3.0, 2.5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--registry", "http://x:1"], "registry_url 'http://x:1' must be empty"),
        (["--drain-timeout", "0s"], "drain_timeout_s must be > 0"),
        (["--stall-floor", "0s"], "stall_floor_s must be > 0"),
        (["--stall-factor", "0.5"], "stall_factor must be >= 1"),
    ],
)
def test_bad_values_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        GatewayConfig.from_argv(argv(tmp_path, *flags))
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_url_in_code_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="redis://, rediss:// or unix://"):
        GatewayConfig(tmp_path, "m", ("h:1",), ("h:2",), registry=RegistryConfig(url="valkey://x"))
