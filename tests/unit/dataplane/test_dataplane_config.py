"""WorkerConfig: the HBM event options are validated where the config is made."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from dataplane.config import WorkerConfig, WorkerRole


def make(tmp_path: Path, **kwargs: object) -> WorkerConfig:
    (tmp_path / "config.json").write_text("{}")
    return WorkerConfig(
        role=WorkerRole.BOTH, model_dir=tmp_path, store_endpoint="127.0.0.1:1", **kwargs
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spec", ["redis://127.0.0.1:6379/0", "rediss://host:6380/1", "strata://127.0.0.1:7000"]
)
def test_reachable_metadata_stores_are_accepted(tmp_path: Path, spec: str) -> None:
    assert make(tmp_path, kv_metadata=spec).kv_metadata == spec


def test_a_metadata_store_other_processes_cannot_reach_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kv_metadata must name a metadata store"):
        make(tmp_path, kv_metadata="embedded")


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("", "kv_metadata: metadata spec is empty"),
        ("127.0.0.1:6379", "kv_metadata: metadata spec '127.0.0.1:6379' has no scheme"),
        ("http://x", "kv_metadata: unknown metadata scheme 'http://' in 'http://x'"),
        ("strata://127.0.0.1", "kv_metadata: metadata spec 'strata://127.0.0.1' has no port"),
        ("strata://:7000", "kv_metadata: metadata spec 'strata://:7000' has no host"),
        (
            "strata://h:70000",
            "kv_metadata: metadata spec 'strata://h:70000' has a bad port '70000'",
        ),
        ("strata://h:x1", "kv_metadata: metadata spec 'strata://h:x1' has a bad port 'x1'"),
        (
            "redis://h:6379/zero",
            "kv_metadata: metadata spec 'redis://h:6379/zero' has a bad database",
        ),
    ],
)
def test_a_malformed_metadata_spec_is_refused_readably(
    tmp_path: Path, spec: str, error: str
) -> None:
    with pytest.raises(ValueError) as caught:
        make(tmp_path, kv_metadata=spec)
    assert str(caught.value).startswith(error)


def test_a_malformed_metadata_spec_is_a_usage_error_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``strata worker --kv-metadata strata://host`` exits 2 with one readable line before
    anything starts, not with a traceback once the engine is up."""
    from dataplane.worker import main

    (tmp_path / "config.json").write_text("{}")
    argv = ["--role", "both", "--model", str(tmp_path), "--store", "127.0.0.1:1"]
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--kv-metadata", "strata://host"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "strata worker: error: kv_metadata: metadata spec 'strata://host' has no port "
        "(strata://HOST:PORT)"
    )


def test_heartbeat_options(tmp_path: Path) -> None:
    config = make(tmp_path, kv_heartbeat_interval_s=0.2, kv_heartbeat_timeout_s=1.0)
    assert (config.kv_heartbeat_interval_s, config.kv_heartbeat_timeout_s) == (0.2, 1.0)
    with pytest.raises(
        ValueError, match="need 0 < kv_heartbeat_interval_s < kv_heartbeat_timeout_s"
    ):
        make(tmp_path, kv_heartbeat_interval_s=5.0, kv_heartbeat_timeout_s=5.0)
    with pytest.raises(ValueError, match="need 0 < kv_heartbeat_interval_s"):
        make(tmp_path, kv_heartbeat_interval_s=0.0)


def test_instance_id_length_is_checked(tmp_path: Path) -> None:
    assert make(tmp_path, instance_id="prefill-0").instance_id == "prefill-0"
    with pytest.raises(ValueError, match="instance_id"):
        make(tmp_path, instance_id="")
    with pytest.raises(ValueError, match="instance_id"):
        make(tmp_path, instance_id="x" * 256)


def test_command_line_options_reach_the_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    base = ["--role", "decode", "--model", str(tmp_path), "--store", "127.0.0.1:1"]
    config = WorkerConfig.from_cli(base, environ={})
    assert (config.kv_metadata, config.instance_id) == (None, None)
    assert (config.kv_heartbeat_interval_s, config.kv_heartbeat_timeout_s) == (1.0, 5.0)
    config = WorkerConfig.from_cli(
        [*base, "--kv-metadata", "strata://127.0.0.1:9", "--instance-id", "decode-1"], environ={}
    )
    assert (config.kv_metadata, config.instance_id) == ("strata://127.0.0.1:9", "decode-1")
    config = WorkerConfig.from_cli(
        [*base, "--kv-heartbeat-interval", "250ms", "--kv-heartbeat-timeout", "2s"], environ={}
    )
    assert (config.kv_heartbeat_interval_s, config.kv_heartbeat_timeout_s) == (0.25, 2.0)


def test_flags_environment_and_shorthands(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    base = ["--role", "prefill", "--model", str(tmp_path), "--store", "[::1]:7600"]
    env = {"STRATA_WORKER_MAX_NUM_SEQS": "4", "STRATA_WORKER_KV_CACHE_SIZE": "2GiB"}
    config = WorkerConfig.from_cli([*base, "--compile", "--no-prefix-caching"], environ=env)
    assert config.role is WorkerRole.PREFILL
    assert config.model_dir == tmp_path.resolve()
    assert (config.max_num_seqs, config.kv_cache_bytes) == (4, 2 << 30)
    assert (config.enforce_eager, config.enable_prefix_caching) == (False, False)
    assert WorkerConfig.from_cli([*base, "--max-num-seqs", "8"], environ=env).max_num_seqs == 8


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--kv-cache-size", "lots"], "--kv-cache-size"),
        (["--role", "both", "--store", "nohost"], "HOST:PORT"),
        (["--role", "cook"], "--role"),
        (["--dtype", "fp3"], "dtype"),
    ],
)
def test_bad_flags_are_usage_errors(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_text("{}")
    base = ["--role", "decode", "--model", str(tmp_path), "--store", "127.0.0.1:1"]
    with pytest.raises(SystemExit) as excinfo:
        WorkerConfig.from_cli([*base, *extra], environ={})
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err


def test_the_grpc_call_limit_defaults_to_eight_batches_and_probes(tmp_path: Path) -> None:
    assert make(tmp_path).rpc_limit == 8 * 32 + 16
    assert make(tmp_path, max_num_seqs=4).rpc_limit == 48
    assert make(tmp_path, max_concurrent_rpcs=10).rpc_limit == 10
    with pytest.raises(ValueError, match="max_concurrent_rpcs must be ≥ 1, got 0"):
        make(tmp_path, max_concurrent_rpcs=0)
    base = ["--role", "both", "--model", str(tmp_path), "--store", "127.0.0.1:1"]
    env = {"STRATA_WORKER_MAX_CONCURRENT_RPCS": "99"}
    assert WorkerConfig.from_cli(base, environ=env).rpc_limit == 99
    assert WorkerConfig.from_cli([*base, "--max-concurrent-rpcs", "7"], environ=env).rpc_limit == 7


def test_the_worker_grpc_server_caps_calls_and_does_not_share_its_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataplane import worker as worker_module

    made: list[dict[str, object]] = []
    real = grpc.aio.server

    def server(**kwargs: object) -> object:
        made.append(kwargs)
        return real(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_module.grpc.aio, "server", server)

    async def create(config: object) -> None:  # grpc.aio wants a running loop
        worker = worker_module.Worker.__new__(worker_module.Worker)
        worker.config = config  # type: ignore[assignment]
        await worker.create_service().stop(None)

    asyncio.run(create(make(tmp_path, max_num_seqs=4)))
    # Behind a launcher's reservation of its port (same-user SO_REUSEPORT), and only there.
    asyncio.run(create(make(tmp_path, max_num_seqs=4, reuse_port=True)))
    alone, launched = made
    assert alone["maximum_concurrent_rpcs"] == 48
    assert ("grpc.so_reuseport", 0) in alone["options"]  # type: ignore[operator]
    assert ("grpc.so_reuseport", 1) in launched["options"]  # type: ignore[operator]


def test_announce_flags_reach_the_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    base = ["--role", "decode", "--model", str(tmp_path), "--store", "127.0.0.1:1"]
    config = WorkerConfig.from_cli(base, environ={})
    assert (config.announce, config.advertise_address) == (None, None)
    assert (config.announce_interval_s, config.announce_ttl_s) == (2.0, 10.0)
    assert config.advertised_endpoint(7001) == "127.0.0.1:7001"
    argv = [*base, "--host", "0.0.0.0", "--insecure", "true", "--advertise-address", "10.1.2.3"]
    argv += ["--announce-interval", "500ms", "--announce-ttl", "3s"]
    env = {"STRATA_WORKER_ANNOUNCE": "redis://:pw@10.0.0.1:6379/0"}  # a password: not in argv
    config = WorkerConfig.from_cli(argv, environ=env)
    assert config.announce == "redis://:pw@10.0.0.1:6379/0"
    assert (config.announce_interval_s, config.announce_ttl_s) == (0.5, 3.0)
    assert config.advertised_host == "10.1.2.3"
    assert config.advertised_endpoint(7001) == "10.1.2.3:7001"
    assert make(tmp_path, advertise_address="fd00::7").advertised_endpoint(5) == "[fd00::7]:5"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"announce": "http://10.0.0.1:6379"},
            "announce 'http://10.0.0.1:6379' must be a redis://, rediss:// or unix:// URL "
            "(the gateways' --registry)",
        ),
        (
            {"announce": "redis://h:1/0", "announce_interval_s": 10.0},
            "need 0 < announce_interval_s < announce_ttl_s (a renewal before the announcement "
            "expires), got 10.0 and 10.0",
        ),
        (
            {"announce": "redis://h:1/0", "announce_interval_s": 0.0},
            "need 0 < announce_interval_s < announce_ttl_s (a renewal before the announcement "
            "expires), got 0.0 and 10.0",
        ),
        (
            {"announce": "redis://h:1/0", "announce_interval_s": 0.1, "announce_ttl_s": 0.5},
            "announce_ttl_s must be >= 1 s, got 0.5",
        ),
        (
            {"announce": "redis://h:1/0", "host": "0.0.0.0", "insecure": True},
            "--announce with --host 0.0.0.0 needs --advertise-address: the address gateways "
            "dial (e.g. the pod's IP)",
        ),
        (
            {"announce": "redis://h:1/0", "host": "::", "insecure": True},
            "--announce with --host :: needs --advertise-address",
        ),
        (
            {"advertise_address": "10.0.0.1:7000"},
            "advertise_address must be a host name or IP address (no port), got '10.0.0.1:7000'",
        ),
        ({"advertise_address": ""}, "advertise_address must be a host name or IP address"),
        ({"advertise_address": "0.0.0.0"}, "advertise_address '0.0.0.0' is a wildcard"),
    ],
)
def test_bad_announce_settings_are_refused(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        make(tmp_path, **kwargs)
    assert str(caught.value).startswith(message)


def test_a_wildcard_host_with_an_advertised_address_announces_that(tmp_path: Path) -> None:
    config = make(
        tmp_path,
        announce="redis://h:1/0",
        host="0.0.0.0",
        insecure=True,
        advertise_address="worker-3.pool.svc",
    )
    assert config.advertised_endpoint(50051) == "worker-3.pool.svc:50051"


def test_the_engine_environment_sizes_its_kv_cache_and_caps_onednn(tmp_path: Path) -> None:
    from dataplane.worker import engine_environment

    config = make(tmp_path, kv_cache_bytes=3 << 30)
    assert engine_environment(config, {}) == {"VLLM_CPU_KVCACHE_SPACE": "3"}
    # An operator's own setting of the KV cache's size wins; oneDNN's default stays oneDNN's.
    assert engine_environment(config, {"VLLM_CPU_KVCACHE_SPACE": "8"}) == {}
    capped = make(tmp_path, kv_cache_bytes=3 << 30, engine_onednn_cache=256)
    assert engine_environment(capped, {"VLLM_CPU_KVCACHE_SPACE": "8"}) == {
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256"
    }
    assert (
        engine_environment(make(tmp_path, engine_onednn_cache=0), {})[
            "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
        ]
        == "0"
    )
    with pytest.raises(ValueError, match="engine_onednn_cache must be >= 0, got -1"):
        make(tmp_path, engine_onednn_cache=-1)
