"""The non-loopback rule (docs/design/security.md §7), on each component's real binary: asked to
listen on a non-loopback address without credentials, it exits at once with status 2 and a
message naming the flags it misses, before serving anything; with TLS credentials, or told
``--insecure true`` (which it logs), it starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from strata_common.credentials import load_or_create_cluster_key
from tests.conftest import REPO_ROOT
from tests.integration.kvstore.node_process import NodeProcess, start_node_process
from tests.tls_certs import Cluster

pytestmark = pytest.mark.timeout(180)

TLS_MESSAGE = "give --tls-cert, --tls-key and --tls-ca, or --insecure true"
KEYS_MESSAGE = (
    "give API keys (--api-key or --api-keys-file, with --cluster-key-file), or --insecure"
)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _refused(result: subprocess.CompletedProcess[str], flag: str, needs: str) -> None:
    assert result.returncode == 2, result.stderr
    assert f"refusing to listen on 0.0.0.0 ({flag}) without credentials: {needs}" in result.stderr
    assert "listening" not in result.stdout and "ready" not in result.stdout


def test_each_component_refuses_a_non_loopback_address_without_credentials(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    _refused(_run("-m", "kvstore.server", "--host", "0.0.0.0"), "--host", TLS_MESSAGE)
    key_file = tmp_path / "cluster.key"
    from strata_common.credentials import load_or_create_cluster_key

    load_or_create_cluster_key(key_file)
    secret = ("--cluster-key-file", str(key_file))  # secret mode alone is loopback-only
    _refused(_run("-m", "kvstore.server", "--host", "0.0.0.0", *secret), "--host", TLS_MESSAGE)
    worker = ("-m", "dataplane.worker", "--role", "both", "--model", str(tiny_model_dir))
    _refused(
        _run(*worker, "--store", "127.0.0.1:7600", "--host", "0.0.0.0", *secret),
        "--host",
        TLS_MESSAGE,
    )
    gateway = ("-m", "controlplane.gateway", "--model-dir", str(tiny_model_dir))
    gateway += ("--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2", *secret)
    _refused(_run(*gateway, "--host", "0.0.0.0"), "--host", KEYS_MESSAGE)
    admin = ("--admin-host", "0.0.0.0", "--admin-port", "0", "--api-key", "k" * 32)
    _refused(_run(*gateway, "--host", "0.0.0.0", *admin), "--admin-host", TLS_MESSAGE)


def _node(log: Path, *args: str) -> NodeProcess:
    return start_node_process(
        log, "--host", "0.0.0.0", "--port", "0", "--arena-size", "32MiB", "--prefault", "false",
        *args,
    )  # fmt: skip


def test_with_tls_or_insecure_a_store_node_starts_on_any_address(tmp_path: Path) -> None:
    node = _node(tmp_path / "insecure.log", "--insecure", "true")
    try:
        assert "--insecure: the store node on 0.0.0.0 WITHOUT credentials" in node.log()
    finally:
        node.stop()
    key = tmp_path / "cluster.key"
    load_or_create_cluster_key(key)
    node = _node(tmp_path / "keyed.log", "--insecure", "true", "--cluster-key-file", str(key))
    try:  # secret mode off loopback: who connects is checked, the wire is not protected
        assert "WITHOUT TLS: the cluster key proves who connects" in node.log()
        assert "WITHOUT credentials" not in node.log()
    finally:
        node.stop()
    tls = Cluster(tmp_path / "ca").tls("store/n1")
    files = ("--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca))
    node = _node(tmp_path / "tls.log", *files)
    try:
        assert "WITHOUT credentials" not in node.log()
    finally:
        node.stop()
