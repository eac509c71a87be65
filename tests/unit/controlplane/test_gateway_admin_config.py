"""GatewayConfig's admin and launcher fields: flags, defaults, validation; and how the gateway
turns them into an AdminConfig and a LocalProcessLauncher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controlplane.admin.config import AdminApiConfig
from controlplane.config import ConfigError, GatewayConfig
from controlplane.gateway import GatewayServer, main
from controlplane.launch.launcher import LaunchConfig, LocalProcessLauncher

TOKEN = "unit-admin-token-0123456789abcdef"


def _model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model-dir", str(tmp_path), "--prefill", "h:1", "--decode", "h:2", *extra]


def test_admin_and_launcher_are_off_by_default(tmp_path: Path) -> None:
    config = GatewayConfig.from_argv(argv(tmp_path))
    assert config.admin.port is None
    assert config.admin.host == "127.0.0.1"
    assert config.admin.token == ""
    assert not config.launch.enabled
    assert (config.launch.prefill, config.launch.decode) == (0, 0)
    assert GatewayServer(config).admin_port is None


def test_admin_and_launcher_flags(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    config = GatewayConfig.from_argv(
        [
            "--model-dir", str(tmp_path),
            "--admin-port", "0", "--admin-host", "::1", "--admin-token-file", str(token_file),
            "--launch-store", "127.0.0.1:7000",
            "--launch-prefill", "2", "--launch-decode", "1",
            "--launch-kv-metadata", "strata://127.0.0.1:7000",
            "--launch-kv-cache-size", "256MiB",
            "--launch-max-model-len", "512",
            "--launch-worker-args", "--max-num-seqs 8 --dtype 'float32'",
            "--launch-cores-per-engine", "2",
            "--launch-cpus", "0,2-4",
            "--launch-log-dir", str(tmp_path / "logs"),
        ]
    )  # fmt: skip
    assert (config.prefill_endpoints, config.decode_endpoints) == ((), ())
    assert (config.admin.host, config.admin.port, config.admin.token) == ("::1", 0, TOKEN)
    assert TOKEN not in repr(config)
    assert config.launch.enabled
    assert (config.launch.store, config.launch.prefill, config.launch.decode) == (
        "127.0.0.1:7000",
        2,
        1,
    )
    assert config.launch.kv_metadata == "strata://127.0.0.1:7000"
    assert config.launch.kv_cache_size == "256MiB"
    assert config.launch.max_model_len == 512
    assert config.launch.worker_args == ("--max-num-seqs", "8", "--dtype", "float32")
    assert config.launch.cores_per_engine == 2
    assert config.launch.cpus == (0, 2, 3, 4)
    assert config.launch.log_dir == tmp_path / "logs"


@pytest.mark.parametrize(
    "extra",
    [
        ["--admin-port", "70000"],
        ["--admin-port", "-1"],
        ["--admin-host", ""],
        ["--admin-token-file", "/nonexistent/token"],
        ["--launch-store", "no-port"],
        ["--launch-prefill", "1"],  # no --launch-store
        ["--launch-store", "h:3", "--launch-decode", "-1"],
        ["--launch-store", "h:3", "--launch-cores-per-engine", "0"],
        ["--launch-store", "h:3", "--launch-cpus", "a-b"],
        ["--launch-store", "h:3", "--launch-max-model-len", "1"],
        ["--launch-store", "h:3", "--launch-worker-args", "--dtype 'unclosed"],
    ],
)
def test_bad_admin_or_launcher_flags_exit_with_status_2(tmp_path: Path, extra: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv(tmp_path, *extra))
    assert info.value.code == 2


def test_with_a_shared_registry_no_worker_need_be_configured(tmp_path: Path) -> None:
    # Workers announce themselves there (docs/design/multihost.md §3).
    registry = ["--registry", "redis://127.0.0.1:6379/0"]
    config = GatewayConfig.from_argv(["--model-dir", str(tmp_path), *registry])
    assert (config.prefill_endpoints, config.decode_endpoints) == ((), ())
    config = GatewayConfig.from_argv(["--model-dir", str(tmp_path), *registry, "--decode", "h:1"])
    assert (config.prefill_endpoints, config.decode_endpoints) == ((), ("h:1",))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "prefill_endpoints must name at least one"),
        (["--prefill", "h:1"], "decode_endpoints must name at least one"),
        (["--launch-store", "h:3", "--launch-prefill", "1"], "decode_endpoints"),
    ],
)
def test_each_role_needs_endpoints_or_launched_workers(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        GatewayConfig.from_argv(["--model-dir", str(tmp_path), *extra])
    assert message in capsys.readouterr().err


def test_launched_workers_may_replace_configured_ones(tmp_path: Path) -> None:
    config = GatewayConfig.from_argv(
        [
            "--model-dir",
            str(tmp_path),
            "--launch-store",
            "h:3",
            "--launch-prefill",
            "1",
            "--launch-decode",
            "1",
        ]
    )
    assert (config.launch.prefill, config.launch.decode) == (1, 1)


def test_empty_token_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n")
    with pytest.raises(SystemExit):
        GatewayConfig.from_argv(argv(tmp_path, "--admin-token-file", str(token_file)))
    assert "must hold one non-empty line" in capsys.readouterr().err


def test_admin_token_comes_from_config_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STRATA_ADMIN_TOKEN", "env-token-0123456789abcdef")
    base = GatewayConfig.from_argv(argv(tmp_path, "--admin-port", "0"))
    assert GatewayServer(base)._admin_config is not None
    assert GatewayServer(base)._admin_config.token == "env-token-0123456789abcdef"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    own = GatewayConfig.from_argv(
        argv(tmp_path, "--admin-port", "0", "--admin-token-file", str(token_file))
    )
    assert GatewayServer(own)._admin_config is not None
    assert GatewayServer(own)._admin_config.token == TOKEN


@pytest.mark.parametrize(
    ("token", "message"),
    [("", "no admin token"), ("short", "at least 16 characters")],
)
def test_unusable_admin_token_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str, message: str
) -> None:
    monkeypatch.delenv("STRATA_ADMIN_TOKEN", raising=False)
    config = GatewayConfig(
        model_dir=tmp_path,
        served_model_name="m",
        prefill_endpoints=("h:1",),
        decode_endpoints=("h:2",),
        admin=AdminApiConfig(port=0, token=token),
    )
    with pytest.raises(ConfigError, match=message):
        GatewayServer(config)


def test_launcher_is_built_from_the_config(tmp_path: Path) -> None:
    config = GatewayConfig(
        model_dir=_model_dir(tmp_path),
        served_model_name="m",
        prefill_endpoints=(),
        decode_endpoints=("h:2",),
        launch=LaunchConfig(
            store="127.0.0.1:7000",
            prefill=1,
            kv_metadata="strata://127.0.0.1:7000",
            kv_cache_size="256MiB",
            max_model_len=512,
            worker_args=("--max-num-seqs", "8"),
            cpus=(0,),
        ),
    )
    server = GatewayServer(config)
    launcher = server._launcher
    assert isinstance(launcher, LocalProcessLauncher)
    assert launcher.cores.cpus == (0,)
    from controlplane.workers.roles import WorkerRole

    argv = launcher._argv(WorkerRole.DECODE, 1234)
    assert argv[1:] == [
        "-m", "dataplane.worker", "--role", "decode",
        "--model", str(tmp_path), "--store", "127.0.0.1:7000",
        "--host", "127.0.0.1", "--port", "1234", "--kv-cache-size", "256MiB",
        "--reuse-port", "true",
        "--max-model-len", "512",
        "--kv-metadata", "strata://127.0.0.1:7000", "--max-num-seqs", "8",
    ]  # fmt: skip


def test_launcher_needs_a_model_directory(tmp_path: Path) -> None:
    config = GatewayConfig(
        model_dir=tmp_path,
        served_model_name="m",
        prefill_endpoints=("h:1",),
        decode_endpoints=("h:2",),
        launch=LaunchConfig(store="127.0.0.1:7000"),
    )
    with pytest.raises(ConfigError, match="launcher: model directory"):
        GatewayServer(config)


def test_launcher_cpus_default_to_the_affinity_set(tmp_path: Path) -> None:
    config = GatewayConfig(
        model_dir=_model_dir(tmp_path),
        served_model_name="m",
        prefill_endpoints=("h:1",),
        decode_endpoints=("h:2",),
        launch=LaunchConfig(store="127.0.0.1:7000"),
    )
    launcher = GatewayServer(config)._launcher
    assert isinstance(launcher, LocalProcessLauncher)
    assert launcher.cores.cpus == tuple(sorted(os.sched_getaffinity(0)))
