"""Fixtures that run the real thing: `strata serve` (store, vLLM prefill and decode workers,
gateway) as a subprocess on loopback ports, and a plain single vLLM engine as the reference."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvstore.client.sync import KVStoreClient
from strata_common.credentials import ClusterCredentials, Identity, read_cluster_key
from strata_common.grpc_auth import ClientAuth
from strata_proto import worker_pb2_grpc
from tests.conftest import REPO_ROOT

SERVE_READY_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class StrataServer:
    """A running `strata serve` and what it printed."""

    proc: subprocess.Popen[str]
    base_url: str
    model: str
    store: str = ""
    prefill: str = ""
    decode: str = ""
    cluster_key_file: Path | None = None
    """CACHE_DIR/cluster.key, as serve printed it: its workers answer only a gateway holding it."""
    lines: list[str] = field(default_factory=list)

    def worker_stub(self, endpoint: str) -> worker_pb2_grpc.WorkerStub:
        """A stub calling the worker at ``endpoint`` as a gateway (docs/design/security.md §5.1)."""
        assert self.cluster_key_file is not None, "serve did not say where its cluster key is"
        auth = ClientAuth(read_cluster_key(self.cluster_key_file), Identity("gateway", "e2e"))
        return worker_pb2_grpc.WorkerStub(auth.intercept(grpc.insecure_channel(endpoint)))

    def store_client(self) -> KVStoreClient:
        """A client of serve's store node that proves it holds the cluster key (HELLO), as a
        worker (docs/design/security.md §4)."""
        assert self.cluster_key_file is not None, "serve did not say where its cluster key is"
        credentials = ClusterCredentials(
            read_cluster_key(self.cluster_key_file), Identity("worker", "e2e")
        )
        return KVStoreClient(self.store, credentials=credentials)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)


def start_server(
    model_dir: Path | None,
    extra: list[str] | None = None,
    ssd_dir: Path | None = None,
    *,
    cpus: tuple[int, ...] | None = None,
) -> StrataServer:
    """Start `strata serve`; each server gets its own SSD-tier directory unless one is given
    (one store node per directory: a second node is refused the lmdb directory lock). ``cpus``:
    run it on these cores only (`taskset`), the launcher's core pool on any host."""
    port = free_port()
    if ssd_dir is None:
        ssd_dir = Path(tempfile.mkdtemp(prefix="strata-e2e-ssd-"))
    argv = [sys.executable, "-m", "strata", "serve", "--port", str(port)]
    if cpus is not None:
        argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
    argv += ["--kv-ssd-dir", str(ssd_dir), "--kv-ssd-size", "1GiB"]
    if model_dir is not None:
        argv += ["--model", str(model_dir)]
    argv += extra or []
    proc = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    server = StrataServer(proc=proc, base_url=f"http://127.0.0.1:{port}", model="")
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            server.lines.append(line.rstrip("\n"))
            m = re.search(r"strata: store=(\S+) prefill=(\S+) decode=(\S+)", line)
            if m:
                server.store, server.prefill, server.decode = m.groups()
            m = re.search(r"strata: cluster key in (\S+) ", line)
            if m:
                server.cluster_key_file = Path(m.group(1))
            m = re.search(r"strata: serving (\S+) on ", line)
            if m:
                server.model = m.group(1)
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + SERVE_READY_TIMEOUT_S
    while not ready.wait(1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                server.stop(signal.SIGKILL)
            tail = "\n".join(server.lines[-60:])
            raise RuntimeError(f"strata serve did not become ready:\n{tail}")
    return server


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path) -> Iterator[StrataServer]:
    server = start_server(tiny_model_dir)
    yield server
    server.stop()


def run_reference(model_dir: Path, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Greedy outputs of one plain vLLM engine (no Strata), in a subprocess."""
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0"}
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "e2e" / "reference_engine.py"), str(model_dir)],
        input=json.dumps(requests),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    marker = "@@RESULTS@@"
    if out.returncode != 0 or marker not in out.stdout:
        raise RuntimeError(f"reference engine failed ({out.returncode}):\n{out.stderr[-20000:]}")
    results: list[dict[str, Any]] = json.loads(out.stdout.split(marker, 1)[1].splitlines()[0])
    return results
