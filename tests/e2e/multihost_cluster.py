"""Strata deployed across network-namespace hosts, for the multi-host end-to-end tests
(docs/design/multihost.md; hosts from tests/netns.py).

Valkey on ``redis``; gateways on the hosts named in ``gateways``, sharing one registry in Valkey;
a store node and a prefill worker on ``a``; a store node and a decode worker on ``b``; clients on
``client``. The workers announce themselves in the registry (docs/design/multihost.md §3): no
gateway is told where they are. Each process is started with the command line an operator
would use, on its host's address, in TLS mode with a certificate of its own (`strata certs`) and
the cluster key file; API keys on the gateways' HTTP ports. The test process itself has no route
into the hosts' subnet: requests and STATS calls run `tests.e2e.multihost_tool` inside a host.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strata_common.credentials import load_or_create_cluster_key
from tests.e2e.dataplane_processes import WORKER_READY_TIMEOUT_S, Process, spawn
from tests.integration.kvstore.valkey_fixture import valkey_binary
from tests.netns import Network
from tests.tls_certs import Cluster

STORE_PORT, WORKER_PORT, HTTP_PORT = 7600, 8001, 8000
API_KEY = "sk-multihost-0123456789"
TOOL = [sys.executable, "-m", "tests.e2e.multihost_tool"]
SOCKETS_TOOL = [sys.executable, "-m", "tests.integration.multihost.sockets_tool"]
RAW_PORT = 9100
HEARTBEAT_TIMEOUT_S = 5.0
"""The store nodes' ``--heartbeat-timeout``: a lost node leaves the index within it."""


@dataclass
class Load:
    """A `multihost_tool load` run in the background on a client host."""

    proc: subprocess.Popen[str]

    def results(self, timeout_s: float) -> list[dict[str, Any]]:
        out, err = self.proc.communicate(timeout=timeout_s)
        assert self.proc.returncode == 0, err[-3000:]
        results: list[dict[str, Any]] = json.loads(out)
        return results


@dataclass
class Deployment:
    net: Network
    cluster: Cluster
    model: Path
    work: Path
    processes: dict[str, Process] = field(default_factory=dict)

    @property
    def redis(self) -> str:
        return f"redis://{self.net['redis'].address}:6379/0"

    @property
    def key_file(self) -> Path:
        return self.work / "cluster.key"

    @property
    def api_keys(self) -> Path:
        return self.work / "api-keys"

    def url(self, gateway: str = "gw") -> str:
        return f"http://{self.net[gateway].address}:{HTTP_PORT}"

    def tls(self, identity: str, host: str) -> list[str]:
        files = self.cluster.files(identity, hosts=[self.net[host].address])
        ca = str(self.cluster.ca)
        return ["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", ca]

    def tool(self, host: str, argv: Sequence[str], stdin: str = "") -> Any:
        done = self.net[host].run(
            [*TOOL, *argv], input=stdin, capture_output=True, text=True, timeout=600, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    def complete(self, prompt: str, max_tokens: int, gateway: str = "gw") -> dict[str, Any]:
        result: dict[str, Any] = self.tool(
            "client", ["complete", self.url(gateway), API_KEY, str(max_tokens)], stdin=prompt
        )
        return result

    def store_stats(self, host: str) -> dict[str, Any]:
        files = self.cluster.files("admin/test", hosts=[self.net[host].address])
        endpoint = f"{self.net[host].address}:{STORE_PORT}"
        stats: dict[str, Any] = self.tool(
            host, ["stats", endpoint, str(files.cert), str(files.key), str(self.cluster.ca)]
        )
        return stats

    def kv_bandwidth(self, *, seed: int, count: int, size: int) -> tuple[int, float]:
        """Store ``count`` blocks of ``size`` bytes on A's node (from host ``a``), then read them
        from host ``b`` through B's node, which reads them from A's across the link: the bytes
        read and the seconds the reads took."""
        args = [str(seed), str(count), str(size)]
        for host, verb in (("a", "kvput"), ("b", "kvread")):
            files = self.cluster.files(f"worker/bench-{host}", hosts=[self.net[host].address])
            endpoint = f"{self.net[host].address}:{STORE_PORT}"
            tls = [str(files.cert), str(files.key), str(self.cluster.ca)]
            result = self.tool(host, [verb, endpoint, *tls, *args])
        assert result["found"] == count, result
        return int(result["bytes"]), float(result["seconds"])

    def raw_bandwidth(self, source: str, target: str, nbytes: int) -> tuple[int, float]:
        """A plain TCP socket's bytes and seconds from ``source`` to ``target``: the link's limit
        beside what Strata moves over it."""
        if f"raw-{target}" not in self.processes:
            address = self.net[target].address
            self.processes[f"raw-{target}"] = spawn(
                self.net[target].argv([*SOCKETS_TOOL, "serve", address, str(RAW_PORT)]),
                r"(listening)",
                30,
            )
        done = self.net[source].run(
            [*SOCKETS_TOOL, "send", self.net[target].address, str(RAW_PORT), str(nbytes)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        received, seconds = done.stdout.split()
        return int(received), float(seconds)

    def worker_stats(self, host: str) -> dict[str, Any]:
        """The worker on ``host``'s Stats rpc (as a gateway certificate)."""
        files = self.cluster.files("gateway/bench", hosts=[self.net[host].address])
        endpoint = f"{self.net[host].address}:{WORKER_PORT}"
        tls = [str(files.cert), str(files.key), str(self.cluster.ca)]
        stats: dict[str, Any] = self.tool(host, ["worker-stats", endpoint, *tls])
        return stats

    def stream(self, prompt: str, max_tokens: int, gateway: str = "gw") -> list[float]:
        """Seconds from sending a streamed greedy completion to each of its tokens."""
        argv = ["stream", self.url(gateway), API_KEY, str(max_tokens)]
        token_s: list[float] = self.tool("client", argv, stdin=prompt)["token_s"]
        return token_s

    def ready_roles(self, gateway: str) -> list[str]:
        """Roles of the workers ``gateway`` holds ready (its /metrics)."""
        roles: list[str] = self.tool("client", ["ready-roles", self.url(gateway)])
        return roles

    def start_load(
        self, gateway: str, *, seconds: float, concurrency: int, timeout_s: float
    ) -> Load:
        """Greedy completions from ``client`` to ``gateway`` for ``seconds``, ``concurrency``
        at a time, each with a client timeout of ``timeout_s`` (a request still open then
        counts as hung)."""
        argv = ["load", self.url(gateway), API_KEY, str(seconds), str(concurrency), str(timeout_s)]
        proc = self.net["client"].popen(
            [*TOOL, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        return Load(proc)

    def wait_for(self, what: str, check: Any, timeout_s: float, interval_s: float = 0.5) -> float:
        """Poll ``check()`` until true; the seconds it took. Fails naming ``what``."""
        start = time.monotonic()
        while not check():
            assert time.monotonic() - start < timeout_s, f"{what}: not within {timeout_s} s"
            time.sleep(interval_s)
        return time.monotonic() - start

    # -- processes ----------------------------------------------------------------------------

    def start_redis(self) -> None:
        host = self.net["redis"]
        # Valkey on its host only: the hosts' subnet exists nowhere but in this test's namespaces.
        argv = [str(valkey_binary()), "--bind", host.address, "--port", "6379"]
        argv += ["--protected-mode", "no", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.work)]
        self.processes["redis"] = spawn(host.argv(argv), r"(Ready to accept connections)", 60)

    def start_store(self, host: str, node: str) -> None:
        address, py = self.net[host].address, sys.executable
        # A's node listens on every address of its host and advertises the one peers dial.
        listen = ["0.0.0.0", "--advertise-address", address] if host == "a" else [address]
        argv = [py, "-m", "kvstore.server", "--host", *listen, "--port", str(STORE_PORT)]
        argv += ["--arena-size", "256MiB", "--prefault", "false", "--metadata", self.redis]
        argv += ["--heartbeat-timeout", f"{HEARTBEAT_TIMEOUT_S:g}s"]
        argv += ["--cluster-key-file", str(self.key_file), *self.tls(f"store/{node}", host)]
        self.processes[f"store-{host}"] = spawn(
            self.net[host].argv(argv), r"kvstore node listening on (\S+)", 120
        )

    def start_worker(self, host: str, role: str, core: int, args: Sequence[str] = ()) -> None:
        address, py = self.net[host].address, sys.executable
        argv = [py, "-m", "dataplane.worker", "--role", role, "--model", str(self.model)]
        # It announces itself in the shared registry (no gateway is told where it is); A's
        # worker listens on every address of its host and announces the one gateways dial.
        listen = ["0.0.0.0", "--advertise-address", address] if host == "a" else [address]
        argv += ["--store", f"{address}:{STORE_PORT}", "--host", *listen, "--announce", self.redis]
        argv += ["--port", str(WORKER_PORT), "--kv-metadata", self.redis]
        argv += ["--cluster-key-file", str(self.key_file), *self.tls(f"worker/{role}-{host}", host)]
        argv += args
        self.processes[f"worker-{host}"] = spawn(
            self.net[host].argv(argv),
            r"strata worker ready .* listening on (\S+)",
            WORKER_READY_TIMEOUT_S,
            env={"VLLM_CPU_OMP_THREADS_BIND": str(core)},
        )

    def start_gateway(self, host: str, args: Sequence[str] = ()) -> None:
        """A gateway told no worker: it serves the workers announced in the shared registry."""
        address, py = self.net[host].address, sys.executable
        argv = [py, "-m", "controlplane.gateway", "--model-dir", str(self.model)]
        argv += ["--served-model-name", "tiny", "--host", address, "--port", str(HTTP_PORT)]
        argv += ["--registry", self.redis, "--kv-metadata", self.redis]
        argv += ["--api-keys-file", str(self.api_keys)]
        argv += ["--cluster-key-file", str(self.key_file), "--no-profile", *args]
        argv += self.tls(f"gateway/{address}:{HTTP_PORT}", host)
        self.processes[f"gateway-{host}"] = spawn(
            self.net[host].argv(argv), r"strata gateway listening on (\S+)", WORKER_READY_TIMEOUT_S
        )


@contextlib.contextmanager
def deploy(
    model: Path,
    work: Path,
    *,
    gateways: Sequence[str] = ("gw",),
    gateway_args: Sequence[str] = (),
    worker_args: Sequence[str] = (),
) -> Iterator[Deployment]:
    """Valkey, a store node + prefill worker on ``a``, a store node + decode worker on ``b``,
    and a gateway on each host of ``gateways``, all sharing one registry."""
    load_or_create_cluster_key(work / "cluster.key")
    keys = work / "api-keys"
    keys.write_text(f"{API_KEY} team\n")
    keys.chmod(0o600)
    with Network(["redis", *gateways, "a", "b", "client"]) as net:
        d = Deployment(net, Cluster(work / "ca"), model, work)
        try:
            d.start_redis()
            d.start_store("a", "A")
            d.start_store("b", "B")
            d.start_worker("a", "prefill", core=0, args=worker_args)
            d.start_worker("b", "decode", core=1, args=worker_args)
            for host in gateways:
                d.start_gateway(host, args=gateway_args)
            for host in gateways:  # ready once a decode is: wait for the prefill worker too
                d.wait_for(
                    f"{host} serves both announced workers",
                    lambda host=host: d.ready_roles(host) == ["decode", "prefill"],
                    120,
                )
            yield d
        finally:
            for process in d.processes.values():
                process.stop()
