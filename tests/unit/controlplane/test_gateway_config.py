"""GatewayConfig: CLI parsing, defaults, validation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from controlplane.config import ConfigError, GatewayConfig, parse_duration_s, parse_endpoint
from controlplane.gateway import main


def argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--model-dir",
        str(tmp_path),
        "--prefill",
        "127.0.0.1:5001",
        "--decode",
        "h:5002",
        *extra,
    ]


def test_from_argv_defaults(tmp_path: Path) -> None:
    config = GatewayConfig.from_argv(argv(tmp_path))
    assert config.model_dir == tmp_path
    assert config.served_model_name == tmp_path.name
    assert config.prefill_endpoints == ("127.0.0.1:5001",)
    assert config.decode_endpoints == ("h:5002",)
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert config.request_timeout_s == 600.0
    assert config.health_check_interval_s == 2.0


def test_from_argv_all_flags(tmp_path: Path) -> None:
    config = GatewayConfig.from_argv(
        argv(
            tmp_path,
            "--served-model-name", "tiny",
            "--prefill", "[::1]:6000,10.0.0.2:6001",
            "--decode", "h2:6002",
            "--host", "0.0.0.0", "--port", "0",
            "--request-timeout", "2m",
            "--worker-startup-timeout", "90",
            "--health-check-interval", "500ms",
            "--health-check-timeout", "1s",
            "--max-request-body-bytes", "4096",
            "--shutdown-grace", "0s",
        )
    )  # fmt: skip
    assert config.served_model_name == "tiny"
    assert config.prefill_endpoints == ("127.0.0.1:5001", "[::1]:6000", "10.0.0.2:6001")
    assert config.decode_endpoints == ("h:5002", "h2:6002")
    assert (config.host, config.port) == ("0.0.0.0", 0)
    assert config.request_timeout_s == 120.0
    assert config.worker_startup_timeout_s == 90.0
    assert config.health_check_interval_s == 0.5
    assert config.health_check_timeout_s == 1.0
    assert config.max_request_body_bytes == 4096
    assert config.shutdown_grace_s == 0.0


@pytest.mark.parametrize(
    "extra",
    [
        ["--prefill", "no-port"],
        ["--decode", "h:70000"],
        ["--port", "-1"],
        ["--request-timeout", "soon"],
        ["--health-check-interval", "0s"],
        ["--served-model-name", "has space"],
        ["--max-request-body-bytes", "10"],
    ],
)
def test_bad_flags_exit_with_status_2(tmp_path: Path, extra: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv(tmp_path, *extra))
    assert info.value.code == 2


def test_missing_model_dir_is_refused(tmp_path: Path) -> None:
    config = GatewayConfig.from_argv(argv(tmp_path))
    with pytest.raises(ConfigError, match="model_dir"):
        replace(config, model_dir=tmp_path / "absent")
    with pytest.raises(ConfigError, match="prefill_endpoints"):
        replace(config, prefill_endpoints=())


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0), ("2.5", 2.5), (".5s", 0.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "-1s", "1d", "1 2s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration_s(text)


@pytest.mark.parametrize("text", ["host", ":80", "h:0", "h:65536", "h:p", "a b:1"])
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_endpoint(text)
