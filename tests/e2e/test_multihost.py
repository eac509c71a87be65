"""Strata on hosts that are really apart (the multi-host issue's acceptance 1; its layout and the
KV path: docs/design/multihost.md).

Five network-namespace hosts (tests/netns.py): Valkey on ``redis``; the gateway on ``gw``; a store
node and a prefill worker on ``a``; a store node and a decode worker on ``b``; the client on
``client``. Each process is started with the command line an operator would use, on its host's
address, in TLS mode with a certificate of its own (`strata certs`), and the cluster key file for
the derived keys; API keys on the gateway's HTTP port. The KV of a prefill on host A reaches the
decode on host B through B's own node, which reads it from A's (counted in B's STATS
``transfers.read_through_blocks``). Greedy output is token-identical to one plain engine, and a
second request sharing the prompt's prefix hits the blocks stored on the first.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from strata_common.credentials import load_or_create_cluster_key
from tests.e2e.conftest import run_reference
from tests.e2e.dataplane_processes import WORKER_READY_TIMEOUT_S, Process, spawn
from tests.integration.kvstore.valkey_fixture import valkey_binary
from tests.netns import Network, unavailable
from tests.tls_certs import Cluster

REASON = unavailable()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
    pytest.mark.slow,
    pytest.mark.timeout(1500),
]
HOSTS = ["redis", "gw", "a", "b", "client"]
STORE_PORT, WORKER_PORT, HTTP_PORT = 7600, 8001, 8000
API_KEY = "sk-multihost-0123456789"
TOOL = [sys.executable, "-m", "tests.e2e.multihost_tool"]
PROMPT = "The cluster on many hosts " + " ".join(f"block{i} of the prompt" for i in range(60))
MAX_TOKENS = 12


@dataclass
class Deployment:
    net: Network
    cluster: Cluster
    processes: dict[str, Process]

    def tls(self, identity: str, host: str) -> list[str]:
        files = self.cluster.files(identity, hosts=[self.net[host].address])
        ca = str(self.cluster.ca)
        return ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", ca]

    def tool(self, host: str, argv: list[str], stdin: str = "") -> Any:
        done = self.net[host].run(
            [*TOOL, *argv], input=stdin, capture_output=True, text=True, timeout=600, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    def complete(self, prompt: str) -> dict[str, Any]:
        url = f"http://{self.net['gw'].address}:{HTTP_PORT}"
        result: dict[str, Any] = self.tool(
            "client", ["complete", url, API_KEY, str(MAX_TOKENS)], stdin=prompt
        )
        return result

    def store_stats(self, host: str) -> dict[str, Any]:
        files = self.cluster.files("admin/test", hosts=[self.net[host].address])
        endpoint = f"{self.net[host].address}:{STORE_PORT}"
        stats: dict[str, Any] = self.tool(
            host, ["stats", endpoint, str(files.cert), str(files.key), str(self.cluster.ca)]
        )
        return stats


@pytest.fixture(scope="module")
def deployment(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("multihost")
    key_file = work / "cluster.key"
    load_or_create_cluster_key(key_file)
    keys = work / "api-keys"
    keys.write_text(f"{API_KEY} team\n")
    keys.chmod(0o600)
    with Network(HOSTS) as net:
        d = Deployment(net, Cluster(work / "ca"), {})
        try:
            _start(d, tiny_model_dir, key_file, keys, work)
            yield d
        finally:
            for process in d.processes.values():
                process.stop()


def _start(d: Deployment, model: Path, key_file: Path, keys: Path, work: Path) -> None:
    net, py = d.net, sys.executable
    redis = f"redis://{net['redis'].address}:6379/0"
    cluster_key = ["--cluster-key-file", str(key_file)]
    # Valkey on its host only: the hosts' subnet exists nowhere but in this test's namespaces.
    d.processes["redis"] = spawn(
        net["redis"].argv(
            [
                *(str(valkey_binary()), "--bind", net["redis"].address, "--port", "6379"),
                *("--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(work)),
            ]
        ),
        r"(Ready to accept connections)",
        60,
    )
    for host, node in (("a", "A"), ("b", "B")):
        address = net[host].address
        d.processes[f"store-{host}"] = spawn(
            net[host].argv(
                [
                    *(py, "-m", "kvstore.server", "--host", address, "--port", str(STORE_PORT)),
                    *("--arena-size", "256MiB", "--prefault", "false", "--metadata", redis),
                    *("--heartbeat-timeout", "5s", *cluster_key),
                    *d.tls(f"store/{node}", host),
                ]
            ),
            r"kvstore node listening on (\S+)",
            120,
        )
    for host, role in (("a", "prefill"), ("b", "decode")):
        address = net[host].address
        d.processes[f"worker-{host}"] = spawn(
            net[host].argv(
                [
                    *(py, "-m", "dataplane.worker", "--role", role, "--model", str(model)),
                    *("--store", f"{address}:{STORE_PORT}", "--host", address),
                    *("--port", str(WORKER_PORT), "--kv-metadata", redis, *cluster_key),
                    *d.tls(f"worker/{role}-{host}", host),
                ]
            ),
            r"strata worker ready .* listening on (\S+)",
            WORKER_READY_TIMEOUT_S,
            env={"VLLM_CPU_OMP_THREADS_BIND": "0"},
        )
    gw = net["gw"].address
    d.processes["gateway"] = spawn(
        net["gw"].argv(
            [
                *(py, "-m", "controlplane.gateway", "--model-dir", str(model)),
                *("--served-model-name", "tiny", "--host", gw, "--port", str(HTTP_PORT)),
                *("--prefill", f"{net['a'].address}:{WORKER_PORT}"),
                *("--decode", f"{net['b'].address}:{WORKER_PORT}"),
                *("--kv-metadata", redis, "--api-keys-file", str(keys), *cluster_key),
                "--no-profile",
                *d.tls(f"gateway/{gw}:{HTTP_PORT}", "gw"),
            ]
        ),
        r"strata gateway listening on (\S+)",
        WORKER_READY_TIMEOUT_S,
    )


def test_kv_crosses_hosts_and_output_is_token_identical(
    deployment: Deployment, tiny_model_dir: Path
) -> None:
    first = deployment.complete(PROMPT)
    (reference,) = run_reference(
        tiny_model_dir,
        [{"kind": "completion", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True}],
    )
    assert first["token_ids"] == reference["token_ids"], (first, reference)
    # The decode on B loaded the prompt's blocks from A's node, through its own.
    b = deployment.store_stats("b")["transfers"]
    assert b["read_through_blocks"] > 0, b
    # A second request sharing the prompt's prefix hits the blocks stored by the first.
    second = deployment.complete(PROMPT + " and one more sentence")
    assert second["cached_tokens"] > 0, second
    print(
        f"blocks read through into B: {b['read_through_blocks']}; "
        f"second request cached tokens: {second['cached_tokens']}"
    )
