"""The restart policy's flags (`--launch-restart*`, LaunchConfig) and their validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.config import GatewayConfig
from controlplane.instances.supervision import RestartPolicy
from controlplane.launch.launcher import LaunchConfig


def argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model-dir", str(tmp_path), "--prefill", "h:1", "--decode", "h:2", *extra]


def test_restart_is_on_by_default(tmp_path: Path) -> None:
    config = GatewayConfig.from_argv(argv(tmp_path))
    assert config.launch.restart_policy() == RestartPolicy(
        grace_s=10.0,
        backoff_s=1.0,
        backoff_max_s=60.0,
        reset_after_s=60.0,
        limit=5,
        window_s=600.0,
    )


def test_restart_flags_and_variables(tmp_path: Path) -> None:
    flags = [
        "--launch-restart-backoff", "500ms", "--launch-restart-backoff-max", "2m",
        "--launch-restart-reset-after", "30s", "--launch-restart-limit", "3",
        "--launch-restart-grace", "4s",
    ]  # fmt: skip
    config = GatewayConfig.from_argv(
        argv(tmp_path, *flags), environ={"STRATA_GATEWAY_LAUNCH_RESTART_WINDOW": "1h"}
    )
    assert config.launch.restart_policy() == RestartPolicy(
        grace_s=4.0,
        backoff_s=0.5,
        backoff_max_s=120.0,
        reset_after_s=30.0,
        limit=3,
        window_s=3600.0,
    )
    off = GatewayConfig.from_argv(argv(tmp_path, "--launch-restart", "off"))
    assert off.launch.restart_policy() is None


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"restart_limit": 0}, "restart_limit must be >= 1, got 0"),
        ({"restart_backoff_s": 10.0, "restart_backoff_max_s": 1.0}, "restart_backoff_max_s"),
        ({"restart_window_s": -1.0}, "restart_window_s must be >= 0"),
    ],
)
def test_bad_restart_settings_are_refused(kwargs: dict[str, float], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        LaunchConfig(**kwargs)  # type: ignore[arg-type]
