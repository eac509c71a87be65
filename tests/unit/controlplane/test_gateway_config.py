"""GatewayConfig: CLI parsing, defaults, validation."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from controlplane.config import ConfigError, GatewayConfig
from controlplane.gateway import main
from controlplane.launch.planner import PlannerSettings
from controlplane.scheduling.policies import PolicyKind
from strata_common.options import add_options


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
    assert (config.http.host, config.http.port) == ("127.0.0.1", 8000)
    assert config.http.request_timeout_s == 600.0
    assert config.registry.health_check_interval_s == 2.0
    http = config.http  # the bounds on what a client may send and hold
    assert http.max_request_body_bytes == 1024 * 1024
    assert (http.max_stop_strings, http.max_stop_chars, http.max_chars_per_token) == (4, 256, 32)
    assert http.tokenizer_threads == 4
    assert (http.read_timeout_s, http.write_timeout_s, http.max_connections) == (60.0, 30.0, 2048)
    assert not http.health_details


def test_from_argv_all_flags(tmp_path: Path) -> None:
    config = GatewayConfig.from_argv(
        argv(
            tmp_path,
            "--served-model-name", "tiny",
            "--prefill", "[::1]:6000,10.0.0.2:6001",
            "--decode", "h2:6002",
            "--host", "0.0.0.0", "--port", "0", "--insecure", "true",
            "--request-timeout", "2m",
            "--worker-startup-timeout", "90",
            "--health-check-interval", "500ms",
            "--health-check-timeout", "1s",
            "--max-request-body-bytes", "4096",
            "--shutdown-grace", "0s",
            "--max-stop-strings", "2", "--max-stop-chars", "16", "--max-chars-per-token", "8",
            "--tokenizer-threads", "1", "--read-timeout", "5s", "--write-timeout", "2s",
            "--max-connections", "10", "--health-details", "true",
        )
    )  # fmt: skip
    assert config.served_model_name == "tiny"
    assert config.prefill_endpoints == ("127.0.0.1:5001", "[::1]:6000", "10.0.0.2:6001")
    assert config.decode_endpoints == ("h:5002", "h2:6002")
    assert (config.http.host, config.http.port) == ("0.0.0.0", 0)
    assert config.http.request_timeout_s == 120.0
    assert config.registry.worker_startup_timeout_s == 90.0
    assert config.registry.health_check_interval_s == 0.5
    assert config.registry.health_check_timeout_s == 1.0
    assert config.http.max_request_body_bytes == 4096
    assert config.http.shutdown_grace_s == 0.0
    http = config.http
    assert (http.max_stop_strings, http.max_stop_chars, http.max_chars_per_token) == (2, 16, 8)
    assert (http.tokenizer_threads, http.read_timeout_s, http.write_timeout_s) == (1, 5.0, 2.0)
    assert http.max_connections == 10 and http.health_details


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
        ["--max-stop-strings", "0"],
        ["--max-chars-per-token", "0"],
        ["--tokenizer-threads", "0"],
        ["--read-timeout", "0s"],
        ["--write-timeout", "0s"],
        ["--max-connections", "0"],
        ["--slo-margin-quantile", "1.5"],
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


def test_environment_variables_below_flags(tmp_path: Path) -> None:
    env = {
        "STRATA_GATEWAY_MODEL_DIR": str(tmp_path),
        "STRATA_GATEWAY_PREFILL": "a:1,b:2",
        "STRATA_GATEWAY_DECODE": "c:3",
        "STRATA_GATEWAY_PORT": "9000",
        "STRATA_GATEWAY_TTFT_SLO": "500ms",
        "STRATA_GATEWAY_PROFILE": "false",
        "STRATA_GATEWAY_ADMIN_PORT": "0",
        "STRATA_GATEWAY_WRITE_TIMEOUT": "5s",
    }
    config = GatewayConfig.from_argv(["--port", "9001"], environ=env)
    assert config.model_dir == tmp_path
    assert (config.prefill_endpoints, config.decode_endpoints) == (("a:1", "b:2"), ("c:3",))
    assert config.http.port == 9001
    assert config.scheduling.default_ttft_slo_s == 0.5
    assert not config.profiling.enabled
    assert config.admin.port == 0
    assert config.http.write_timeout_s == 5.0


def test_every_flag_of_the_cli(tmp_path: Path) -> None:
    """The flags `strata serve`, the docs and the tests use: one per field, same names."""
    parser = argparse.ArgumentParser()
    add_options(parser, GatewayConfig, env_prefix="STRATA_GATEWAY_", environ={})
    flags = {s for action in parser._actions for s in action.option_strings}
    assert flags == {
        "-h", "--help", "--model-dir", "--served-model-name", "--prefill", "--decode",
        "--host", "--port", "--request-timeout", "--max-request-body-bytes", "--shutdown-grace",
        "--max-stop-strings", "--max-stop-chars", "--max-chars-per-token", "--tokenizer-threads",
        "--read-timeout", "--write-timeout", "--max-connections", "--health-details",
        "--registry", "--worker-startup-timeout", "--health-check-interval",
        "--health-check-timeout", "--drain-timeout", "--stall-floor", "--stall-factor",
        "--announcement-grace", "--policy", "--kv-metadata",
        "--local-prefill-threshold", "--conditional-disaggregation", "--local-fallback",
        "--no-conditional-disaggregation", "--ttft-slo", "--tpot-slo", "--slo-margin-quantile",
        "--profile", "--no-profile",
        "--profile-max-model-len", "--profile-max-batch", "--profile-repeats",
        "--profile-concurrency", "--profile-budget",
        "--profile-max-step", "--profile-max-share", "--profile-sibling-factor",
        "--profile-observed-factor", "--admin-host", "--admin-port", "--admin-token-file",
        "--launch-store", "--launch-prefill", "--launch-decode", "--launch-kv-metadata",
        "--launch-kv-cache-size", "--launch-max-model-len", "--launch-worker-args",
        "--launch-cores-per-engine", "--launch-cpus", "--launch-log-dir", "--launch-standby",
        "--launch-restart", "--launch-restart-grace", "--launch-restart-backoff",
        "--launch-restart-backoff-max", "--launch-restart-reset-after", "--launch-restart-limit",
        "--launch-restart-window", "--k8s-namespace", "--k8s-prefill-deployment",
        "--k8s-decode-deployment", "--k8s-dry-run", "--k8s-kubeconfig", "--k8s-removal-timeout",
        "--k8s-request-timeout", "--cluster-key-file", "--api-key", "--api-keys-file",
        "--api-keys-redis", "--api-keys-refresh", "--tls-cert", "--tls-key", "--tls-ca",
        "--insecure", "--planner", "--planner-interval", "--planner-engine-start",
        "--planner-scale-down-after", "--planner-max-workers", "--planner-min-prefill",
        "--planner-min-decode",
    }  # fmt: skip


def test_kubernetes_launcher_flags(tmp_path: Path) -> None:
    config = GatewayConfig.from_argv(argv(tmp_path))
    assert not config.k8s.enabled  # off by default
    assert (config.k8s.prefill_deployment, config.k8s.decode_deployment) == (
        "strata-prefill",
        "strata-decode",
    )
    config = GatewayConfig.from_argv(
        argv(
            tmp_path,
            "--k8s-namespace", "serving", "--k8s-prefill-deployment", "p",
            "--k8s-decode-deployment", "d", "--k8s-dry-run", "true",
            "--k8s-kubeconfig", str(tmp_path / "kubeconfig"), "--k8s-removal-timeout", "2m",
            "--k8s-request-timeout", "3s",
        )
    )  # fmt: skip
    k8s = config.k8s
    assert (k8s.enabled, k8s.namespace, k8s.prefill_deployment, k8s.decode_deployment) == (
        True,
        "serving",
        "p",
        "d",
    )
    assert (k8s.dry_run, k8s.kubeconfig) == (True, tmp_path / "kubeconfig")
    assert (k8s.removal_timeout_s, k8s.request_timeout_s) == (120.0, 3.0)
    env = {"STRATA_GATEWAY_K8S_NAMESPACE": "from-env"}
    assert GatewayConfig.from_argv(argv(tmp_path), environ=env).k8s.namespace == "from-env"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k8s-namespace", "Serving"], "k8s_namespace must be a Kubernetes name"),
        (["--k8s-namespace", "s", "--k8s-decode-deployment", "strata-prefill"], "must differ"),
        (["--k8s-decode-deployment", "a_b"], "k8s_decode_deployment must be a Kubernetes name"),
        (["--k8s-removal-timeout", "0s"], "k8s_removal_timeout must be > 0"),
        (
            ["--k8s-namespace", "s", "--launch-store", "127.0.0.1:7000"],
            "--k8s-namespace (scale Kubernetes Deployments) and --launch-store",
        ),
    ],
)
def test_kubernetes_launcher_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        GatewayConfig.from_argv(argv(tmp_path, *extra))
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_routing_flags(tmp_path: Path) -> None:
    config = GatewayConfig.from_argv(
        argv(
            tmp_path,
            "--policy", "round_robin", "--ttft-slo", "500ms", "--tpot-slo", "50ms",
            "--local-prefill-threshold", "64", "--no-conditional-disaggregation", "--no-profile",
            "--profile-budget", "10s", "--profile-max-step", "500ms", "--profile-max-share", "1",
            "--profile-sibling-factor", "2", "--profile-observed-factor", "4.5",
            "--slo-margin-quantile", "0.99",
        )
    )  # fmt: skip
    assert config.scheduling.slo_margin_quantile == 0.99
    assert config.routing.policy is PolicyKind.ROUND_ROBIN
    assert config.scheduling.default_ttft_slo_s == 0.5
    assert config.scheduling.default_tpot_slo_s == 0.05
    assert config.scheduling.local_prefill_threshold_tokens == 64
    assert not config.scheduling.conditional_disaggregation
    assert not config.profiling.enabled
    assert (config.profiling.budget_s, config.profiling.max_step_s) == (10.0, 0.5)
    assert config.profiling.max_share == 1.0
    assert (config.profiling.sibling_factor, config.profiling.observed_factor) == (2.0, 4.5)
    defaults = GatewayConfig.from_argv(argv(tmp_path))
    assert defaults.scheduling.local_prefill_threshold_tokens == 0
    assert defaults.scheduling.conditional_disaggregation and defaults.profiling.enabled
    assert defaults.scheduling.slo_margin_quantile == 0.9


def test_cluster_key_file_flag_env_identity_and_launched_workers(tmp_path: Path) -> None:
    from controlplane.launch.launcher import LocalProcessLauncher
    from controlplane.workers.roles import WorkerRole
    from strata_common.credentials import Identity, load_or_create_cluster_key

    (tmp_path / "config.json").write_text("{}")
    key_file = tmp_path / "cluster.key"
    key, _ = load_or_create_cluster_key(key_file)
    assert GatewayConfig.from_argv(argv(tmp_path)).cluster.client_auth("x") is None
    config = GatewayConfig.from_argv(
        argv(tmp_path, "--cluster-key-file", str(key_file), "--host", "::1", "--port", "8001")
    )
    assert config.cluster.key_file == key_file
    assert config.cluster_name == "[::1]:8001"
    auth = config.cluster.client_auth(config.cluster_name)
    assert auth is not None and auth.identity == Identity("gateway", "[::1]:8001")
    from_env = GatewayConfig.from_argv(
        argv(tmp_path), environ={"STRATA_GATEWAY_CLUSTER_KEY_FILE": str(key_file)}
    )
    assert from_env.cluster.key_file == key_file
    launcher = LocalProcessLauncher(
        replace(config.launch, store="127.0.0.1:7600").launcher_config(tmp_path, key_file)
    )
    launched = launcher._argv(WorkerRole.DECODE, 7001)
    assert launched[launched.index("--cluster-key-file") + 1] == str(key_file)
    assert key.hex() not in " ".join(launched)  # the path, never the key
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        replace(config.cluster, key_file=key_file)


def test_parsing_a_gateway_config_loads_no_kubernetes_client(tmp_path: Path) -> None:
    """kubernetes_asyncio (and its aiohttp client machinery) is loaded by the launcher only,
    which the gateway imports only with --k8s-namespace (when it builds its launcher)."""
    args = [*argv(tmp_path), "--k8s-namespace", "strata"]
    code = (
        "import sys\n"
        "from controlplane.config import GatewayConfig\n"
        "import controlplane.gateway\n"
        f"assert GatewayConfig.from_argv({args!r}).k8s.enabled\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes_asyncio'"
        " or m == 'controlplane.launch.kubernetes'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_planner_needs_slos(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="--ttft-slo and --tpot-slo"):
        GatewayConfig(
            model_dir=tmp_path,
            prefill_endpoints=("127.0.0.1:1",),
            decode_endpoints=("127.0.0.1:2",),
            planner=PlannerSettings(kind="strata"),
        )
