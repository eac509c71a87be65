"""Scaling the decode pool with `strata admin` while a load runs, engines sharing cores
(issue 4, acceptance 2; issue 8, acceptance 2).

`strata serve` with 1 prefill + 1 decode real vLLM worker (the tiny seeded model), started by the
gateway's launcher, one engine per core on this 2-core host, and the admin API on loopback with the
token `serve` wrote to CACHE_DIR/admin-token (found there by `strata admin`, which gets no token on
its command line or in its environment). A bounded load — three clients, streaming chat and
non-streaming completions through the official `openai` SDK — runs for the whole test. With the
`strata admin` CLI, as a subprocess:

1. `list` shows 2 ready instances (1 prefill, 1 decode);
2. `scale --role decode --replicas 2`: a new decode worker is launched on a core a busy engine
   already uses, is ready within 60 s, and serves requests (its own Stats RPC counts them);
3. `scale --role decode --replicas 1`: one decode worker is drained (its start-up profile, if
   still running, is cancelled first), forgotten and its process stopped; the engines left are
   on separate cores again;
4. every request of the load succeeded, each with exactly the tokens it asked for;
5. a wrong token exits with 3 (UNAUTHENTICATED).

Engine starts: 2 at start-up + 1 for the scale-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from strata.cli import CLUSTER_KEY_FILE_NAME
from strata_common.credentials import Identity, read_cluster_key
from strata_common.grpc_auth import ClientAuth
from strata_proto import worker_pb2, worker_pb2_grpc
from tests.conftest import REPO_ROOT
from tests.e2e.conftest import StrataServer, free_port, start_server

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
EXIT_UNAUTHENTICATED = 3
ENGINE_START_TIMEOUT_S = 60.0
"""A new engine is ready within this, even on a core a busy engine shares (issue 8)."""


@dataclass
class AdminServe:
    server: StrataServer
    cache_dir: Path
    address: str

    def admin(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        """`strata admin` as an operator runs it: the token from serve's token file unless one
        is given."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_ADMIN_")}
        env["STRATA_CACHE_DIR"] = str(self.cache_dir)
        argv = [sys.executable, "-m", "strata", "admin", "--address", self.address]
        if token is not None:
            argv += ["--token", token]
        return subprocess.run(
            [*argv, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
        )

    def instances(self) -> list[dict[str, Any]]:
        result = self.admin("--json", "list")
        assert result.returncode == 0, result.stderr
        infos: list[dict[str, Any]] = json.loads(result.stdout)
        return infos

    def listed(self) -> list[dict[str, Any]]:
        """What `strata admin --json list` prints, from an in-process admin call: polling
        through a new CLI process every second would itself load the 2-core host."""
        from controlplane.admin.convert import instance_from_proto
        from strata.admin_cli import instance_json
        from strata.admin_token import default_token_path
        from strata_proto import admin_pb2, admin_pb2_grpc

        token = default_token_path(self.cache_dir).read_text().strip()
        with grpc.insecure_channel(self.address) as channel:
            reply = admin_pb2_grpc.AdminStub(channel).List(
                admin_pb2.ListRequest(),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=30,
            )
        return [instance_json(instance_from_proto(m)) for m in reply.instances]

    def wait_for(
        self, what: str, condition: Callable[[list[dict[str, Any]]], bool], timeout_s: float
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            infos = self.listed()
            if condition(infos):
                return infos
            if time.monotonic() > deadline:
                tail = "\n".join(self.server.lines[-60:])
                raise AssertionError(f"{what}: not within {timeout_s:g} s; {infos}\n{tail}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def serve(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminServe]:
    cache_dir = tmp_path_factory.mktemp("admin-scale-cache")
    admin_port = free_port()
    extra = ["--cache-dir", str(cache_dir), "--admin-port", str(admin_port)]
    extra += ["--prefill-workers", "1", "--decode-workers", "1"]
    extra += ["--store-arena-size", "512MiB"]
    cpus = tuple(sorted(os.sched_getaffinity(0)))[:2]
    if len(cpus) < 2:
        pytest.skip("needs 2 cores")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("STRATA_ADMIN_TOKEN", raising=False)  # serve makes and keeps its own
        # On two cores on any host: one engine per core, then three engines on two.
        server = start_server(tiny_model_dir, extra, cpus=cpus)
    try:
        yield AdminServe(server, cache_dir, f"127.0.0.1:{admin_port}")
    finally:
        assert server.stop(timeout_s=120) == 0, "\n".join(server.lines[-40:])


@dataclass
class Load:
    """Three clients sending requests until stopped, each pausing ``think_s`` after a response
    (a light chat load: the engines are working, not saturated); odd ones stream chat, even
    ones are plain completions. Every request asks for MAX_TOKENS tokens (ignore_eos)."""

    base_url: str
    model: str
    num_clients: int = 3
    think_s: float = 0.2
    num_ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index in range(self.num_clients):
            thread = threading.Thread(target=self._client, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(300)

    def wait_ok(self, num_ok: int, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.num_ok < num_ok and not self.failures:
            assert time.monotonic() < deadline, f"load: {self.num_ok} < {num_ok} requests done"
            time.sleep(0.5)

    def _client(self, index: int) -> None:
        client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0)
        extra = {"ignore_eos": True}
        number = index
        while not self._stop.wait(self.think_s if number > index else 0.0):
            number += self.num_clients
            try:
                if number % 2:
                    self._stream_chat(client, number, extra)
                else:
                    response = client.completions.create(
                        model=self.model,
                        prompt=f"request {number}: the river tower keeps seven cache blocks",
                        max_tokens=MAX_TOKENS,
                        extra_body=extra,
                        timeout=300,
                    )
                    assert response.usage is not None
                    assert response.usage.completion_tokens == MAX_TOKENS
                    assert response.choices[0].finish_reason == "length"
            except Exception as exc:  # every failure is reported by the test
                with self._lock:
                    self.failures.append(f"request {number}: {exc!r}")
                continue
            with self._lock:
                self.num_ok += 1

    def _stream_chat(self, client: openai.OpenAI, number: int, extra: dict[str, Any]) -> None:
        stream = client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": f"request {number}: name a city"}],
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
            timeout=300,
        )
        finish = None
        usage = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason is not None:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                usage = chunk.usage
        assert finish == "length"
        assert usage is not None and usage.completion_tokens == MAX_TOKENS


def _worker_stats(endpoint: str, cache_dir: Path) -> Any:
    """The worker's Stats, asked as a gateway with serve's cluster key (a worker answers no one
    else: docs/design/security.md §5.1)."""
    key = read_cluster_key(cache_dir / CLUSTER_KEY_FILE_NAME)
    auth = ClientAuth(key, Identity("gateway", "e2e-test"))
    with grpc.insecure_channel(endpoint) as channel:
        stub = worker_pb2_grpc.WorkerStub(auth.intercept(channel))
        return stub.Stats(worker_pb2.StatsRequest(), timeout=10)


def _worker_gone(endpoint: str, cache_dir: Path) -> bool:
    try:
        _worker_stats(endpoint, cache_dir)
    except grpc.RpcError as exc:
        return exc.code() is grpc.StatusCode.UNAVAILABLE
    return False


def _decodes(infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i for i in infos if i["role"] == "decode"]


def _pinned_cores(endpoint: str) -> set[int]:
    """The cores the engine behind ``endpoint`` computes on: the single-core affinities of the
    threads of the process listening there and of its descendants (vLLM pins its OpenMP
    threads; other threads are unpinned)."""
    import psutil

    port = int(endpoint.rsplit(":", 1)[1])
    (pid,) = {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
    }
    root = psutil.Process(pid)
    cores: set[int] = set()
    for process in [root, *root.children(recursive=True)]:
        for thread in process.threads():
            try:
                affinity = os.sched_getaffinity(thread.id)
            except OSError:
                continue
            if len(affinity) == 1:
                cores |= affinity
    return cores


def test_scale_decode_up_and_down_under_load_on_shared_cores(serve: AdminServe) -> None:
    listed = serve.admin("list")
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    assert header.split() == ["ID", "ROLE", "STATE", "ENDPOINT", "LOAD"]
    assert sorted(line.split()[1:3] for line in lines) == [
        ["decode", "ready"],
        ["prefill", "ready"],
    ]
    infos = serve.instances()
    assert all(i["launched"] for i in infos), infos  # serve's workers are the launcher's
    (first,) = _decodes(infos)

    load = Load(serve.server.base_url, serve.server.model)
    load.start()
    try:
        load.wait_ok(4)

        # Up: a third engine on a 2-core host shares a busy engine's core; ready within 60 s.
        scaled = serve.admin("scale", "--role", "decode", "--replicas", "2")
        assert scaled.returncode == 0, scaled.stderr
        infos = serve.wait_for(
            "the new decode worker ready",
            lambda infos: (
                len(_decodes(infos)) == 2 and all(i["state"] == "ready" for i in _decodes(infos))
            ),
            timeout_s=ENGINE_START_TIMEOUT_S,
        )
        (new,) = [i for i in _decodes(infos) if i["id"] != first["id"]]
        assert new["launched"]
        engines = [_pinned_cores(i["endpoint"]) for i in infos]
        assert sum(len(cores) for cores in engines) > len(set().union(*engines)), engines
        deadline = time.monotonic() + 120
        while _worker_stats(new["endpoint"], serve.cache_dir).num_requests < 1:
            assert not load.failures, load.failures
            assert time.monotonic() < deadline, "the new decode worker got no request"
            time.sleep(1.0)
        load.wait_ok(load.num_ok + 2)

        # Down: one decode worker drained, then forgotten and stopped.
        scaled = serve.admin("--json", "scale", "--role", "decode", "--replicas", "1")
        assert scaled.returncode == 0, scaled.stderr
        draining = [i for i in json.loads(scaled.stdout) if i["state"] == "draining"]
        assert len(draining) == 1, scaled.stdout
        retired = draining[0]
        serve.wait_for(
            "the drained decode worker forgotten",
            lambda infos: retired["id"] not in {i["id"] for i in infos},
            timeout_s=120,
        )
        deadline = time.monotonic() + 60
        while not _worker_gone(retired["endpoint"], serve.cache_dir):
            assert time.monotonic() < deadline, f"{retired['endpoint']} still answers"
            time.sleep(1.0)
        infos = serve.instances()
        assert len(_decodes(infos)) == 1
        num_ok = load.num_ok
        load.wait_ok(num_ok + 4)  # served by the one decode worker left
        # The two engines left compute on separate cores again, once the retired worker's
        # process has exited (its engine shuts down after its gRPC port).
        deadline = time.monotonic() + 60
        while True:
            engines = [_pinned_cores(i["endpoint"]) for i in infos]
            if all(len(c) == 1 for c in engines) and engines[0] != engines[1]:
                break
            assert time.monotonic() < deadline, (engines, serve.server.lines[-40:])
            time.sleep(1.0)
    finally:
        load.stop()
    assert load.failures == []
    assert load.num_ok >= 10
    assert not [line for line in serve.server.lines if "EngineDeadError" in line]

    stats = serve.admin("stats")
    assert stats.returncode == 0, stats.stderr
    assert stats.stdout.startswith("policy: ")
    refused = serve.admin("list", token="wrong-token-0123456789abcdef")
    assert refused.returncode == EXIT_UNAUTHENTICATED
    assert "UNAUTHENTICATED" in refused.stderr
