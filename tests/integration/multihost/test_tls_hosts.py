"""TLS mode between hosts that are really apart (network namespaces, tests/netns.py;
docs/design/security.md §3.1, §7): a store node on its host's network address refuses to start
without credentials, starts with its certificate (issued for that address), serves a worker on
another host that presents its own, and refuses a client without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.netns import Network, unavailable
from tests.tls_certs import Cluster

REASON = unavailable()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
    pytest.mark.timeout(180),
]
PORT = 7600
CLIENT = [sys.executable, "-m", "tests.integration.multihost.tls_client"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def test_a_store_node_and_a_worker_on_two_hosts(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "ca")
    with Network(["node", "worker"]) as net:
        address = net["node"].address
        node_argv = [
            *(sys.executable, "-m", "kvstore.server", "--host", address, "--port", str(PORT)),
            *("--arena-size", "32MiB", "--prefault", "false"),
        ]
        refused = net["node"].run(
            node_argv, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        assert refused.returncode == 2
        assert f"refusing to listen on {address} (--host) without credentials" in refused.stderr
        store = cluster.files("store/n1", hosts=[address])
        tls = [
            "--tls-cert",
            str(store.cert),
            "--tls-key",
            str(store.key),
            "--tls-ca",
            str(cluster.ca),
        ]
        node = net["node"].popen(
            [*node_argv, *tls], cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, text=True
        )
        try:
            assert node.stdout is not None
            assert node.stdout.readline().startswith("kvstore node listening on ")
            endpoint = f"{address}:{PORT}"
            worker = cluster.files("worker/w1", hosts=[net["worker"].address])
            files = [str(worker.cert), str(worker.key), str(cluster.ca)]
            for argv, expected in (
                ([endpoint, *files], "ok"),
                ([endpoint], "KVStoreConnectionLost: "),  # plaintext: the node drops it
            ):
                done = net["worker"].run(
                    [*CLIENT, *argv], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                    timeout=120, check=False,
                )  # fmt: skip
                assert done.stdout.startswith(expected), (done.stdout, done.stderr)
        finally:
            node.terminate()
            node.wait(30)
