"""`strata serve`'s flags: ServeConfig, its defaults, its environment and its usage errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from strata.serve_config import ServeConfig
from strata_common.options import add_options, from_namespace, parse_into


def parse(argv: list[str], environ: dict[str, str] | None = None) -> ServeConfig:
    parser = argparse.ArgumentParser(prog="strata serve")
    add_options(parser, ServeConfig, env_prefix="STRATA_SERVE_", environ=environ or {})
    return parse_into(parser, ServeConfig, argv)


def test_defaults_are_the_documented_setup() -> None:
    config = parse([])
    assert config == ServeConfig()
    assert (config.host, config.port, config.admin_port) == ("127.0.0.1", 8000, None)
    assert (config.prefill_workers, config.decode_workers, config.kv_ssd) == (1, 1, True)
    assert (config.kv_cache_size, config.store_arena_size) == (1 << 30, 2 << 30)
    assert (config.kv_ssd_ttl_s, config.ready_timeout_s) == (86400.0, 600.0)
    assert not config.kv_ssd_write_through
    assert parse(["--kv-ssd-write-through", "true"]).kv_ssd_write_through
    assert config.api_keys_file is None


def test_flags_units_shorthands_and_environment(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    config = parse(
        ["--model", str(tmp_path), "--kv-cache-size", "2GiB", "--kv-ssd-ttl", "1h", "--no-kv-ssd"],
        environ={"STRATA_SERVE_DECODE_WORKERS": "2", "STRATA_SERVE_READY_TIMEOUT": "90"},
    )
    assert config.model == tmp_path
    assert (config.kv_cache_size, config.kv_ssd_ttl_s, config.kv_ssd) == (2 << 30, 3600.0, False)
    assert (config.decode_workers, config.ready_timeout_s) == (2, 90.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prefill-workers", "0"], "--prefill-workers must be in 1..64"),
        (["--decode-workers", "65"], "--decode-workers must be in 1..64"),
        (["--model", "/nonexistent"], "not a Hugging Face model directory"),
        (["--dtype", "fp3"], "--dtype must be one of"),
        (["--kv-cache-size", "lots"], "--kv-cache-size"),
        (["--port", "70000"], "--port must be in 0..65535"),
        (
            ["--api-keys-file", "/nonexistent/keys"],
            "--api-keys-file /nonexistent/keys is not a file",
        ),
        (["--kv-ssd-write-through", "true", "--no-kv-ssd"], "needs the SSD tier"),
        (
            ["--host", "0.0.0.0"],
            "refusing to listen on 0.0.0.0 (--host) without credentials: give API keys "
            "(--api-keys-file), or --insecure true",
        ),
    ],
)
def test_usage_errors_name_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        parse(argv)
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_from_namespace_is_what_the_cli_uses() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, ServeConfig, env_prefix="STRATA_SERVE_", environ={})
    assert from_namespace(ServeConfig, parser.parse_args(["--port", "0"])).port == 0
