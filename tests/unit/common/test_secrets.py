"""strata_common/secrets.py: URLs without their passwords, command lines without passwords, and
children's environments without secrets."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from strata_common.options import add_options, option, parse_into
from strata_common.secrets import has_password, redact_url, scrubbed_environment


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        ("rediss://strata:hunter2@redis.example/1", "rediss://strata:***@redis.example/1"),
        ("redis://u:p@[::1]:6379", "redis://u:***@[::1]:6379"),
        ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
        ("redis://strata@10.0.0.5:6379", "redis://strata@10.0.0.5:6379"),
        ("strata://127.0.0.1:7601", "strata://127.0.0.1:7601"),
        ("embedded", "embedded"),
        ("redis://u:p@host:notaport", "***"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "hunter2" not in redact_url(url)


def test_has_password() -> None:
    assert has_password("redis://:pw@h:1")
    assert has_password("redis://user:pw@h:1/0")
    assert not has_password("redis://user@h:1")
    assert not has_password("redis://h:1")
    assert not has_password("a:b@c")  # not a URL
    assert not has_password("")


def test_children_keep_the_runtime_and_their_own_configuration_only() -> None:
    environ = {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": "/src",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": "2",
        "STRATA_CACHE_DIR": "/cache",
        "STRATA_WORKER_DTYPE": "float32",
        "STRATA_GATEWAY_REGISTRY": "redis://:pw@h:1",
        "STRATA_ADMIN_TOKEN": "t0ken",
        "HF_TOKEN": "hf_x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "DATABASE_PASSWORD": "x",
        "SOMETHING_ELSE": "x",
    }
    env = scrubbed_environment(environ, prefixes=("STRATA_WORKER_",), extra={"X": "1"})
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": "/src",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "OMP_NUM_THREADS": "2",
        "STRATA_CACHE_DIR": "/cache",
        "STRATA_WORKER_DTYPE": "float32",
        "X": "1",
    }
    gateway = scrubbed_environment(
        environ, prefixes=("STRATA_GATEWAY_",), keep=("STRATA_ADMIN_TOKEN",)
    )
    assert gateway["STRATA_ADMIN_TOKEN"] == "t0ken"
    assert gateway["STRATA_GATEWAY_REGISTRY"] == "redis://:pw@h:1"
    assert "STRATA_WORKER_DTYPE" not in gateway and "HF_TOKEN" not in gateway


@dataclass(frozen=True)
class _Config:
    registry: str = option("", help="registry URL")


def _parse(argv: list[str], environ: dict[str, str]) -> _Config:
    parser = argparse.ArgumentParser()
    add_options(parser, _Config, env_prefix="T_", environ=environ)
    return parse_into(parser, _Config, argv)


def test_a_password_on_the_command_line_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        _parse(["--registry", "redis://:pw@h:1"], {})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--registry: a password on the command line is readable" in err
    assert "pw@" not in err
    # The same value from the environment is fine; a URL without a password too.
    assert _parse([], {"T_REGISTRY": "redis://:pw@h:1"}).registry == "redis://:pw@h:1"
    assert _parse(["--registry", "redis://h:1"], {}).registry == "redis://h:1"
