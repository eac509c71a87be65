"""A disaggregated cluster of separate processes for the chaos tests that need to get between
its parts: one store node, prefill and decode workers (real vLLM engines, tiny model), each
worker optionally talking to the store through its own fault-injecting proxy (``FrameProxy``,
tests/integration/kvstore/frame_proxy.py), and a gateway in this process (its registry and
stats readable).

``start_cluster(...)`` is a generator (``yield from`` it in a fixture); everything it started
is stopped when it is closed, also after a failure. Every process has fixed ports, so
``Cluster.restart_worker`` / ``restart_store`` bring a killed one back where the others look
for it. ``kill_tree`` kills a worker (engine processes included) with SIGKILL;
``store_stats`` reads the store node's STATS, ``engine_blocks_in_use`` the KV blocks the
workers' engines hold.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controlplane.config import GatewayConfig, HttpConfig, RoutingConfig
from controlplane.gateway import GatewayServer
from controlplane.text.tokenizer import ModelTokenizer
from kvstore.client.sync import KVStoreClient
from strata_common.options import replace_nested
from strata_proto import worker_pb2
from tests.e2e.conftest import StrataServer, free_port
from tests.e2e.dataplane_processes import Process, spawn, start_store, start_worker, stub
from tests.integration.controlplane.conftest import LoopThread
from tests.integration.kvstore.frame_proxy import FrameProxy, Hook
from tests.proc_tree import descendants

MODEL = "tiny"

ProxyHook = Hook
"""What a worker's proxy does with each of its request frames (``FrameProxy``'s ``on_request``)."""


@dataclass
class Cluster:
    loop: LoopThread
    store: Process
    prefills: list[Process]
    decodes: list[Process]
    server: GatewayServer | None
    """The gateway in this process; None when it runs as its own process (``gateway``)."""
    url: str
    proxies: dict[str, FrameProxy] = field(default_factory=dict)
    """The proxy between each worker (by endpoint) and the store, where one was asked for."""
    model: str = MODEL
    gateway: Process | None = None
    """The gateway's process (``start_cluster(separate_gateway=True)``)."""
    model_dir: Path = Path()
    store_args: tuple[str, ...] = ()
    worker_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Each worker's arguments (by endpoint): what a restart gives it again."""

    def restart_store(self) -> Process:
        """Start the (dead) store node again on the same ports, with an empty arena."""
        assert self.store.proc.poll() is not None, "the store is still running"
        self.store = start_store(*self.store_args)
        return self.store

    def restart_worker(self, dead: Process) -> Process:
        """Start a (dead) worker again on the same endpoint and role; the gateway's health
        checks find it ready again."""
        assert dead.proc.poll() is not None, "the worker is still running"
        role, *args = self.worker_args[dead.endpoint]
        worker = start_worker(self.model_dir, role, *args)
        for group in (self.prefills, self.decodes):
            if dead in group:
                group[group.index(dead)] = worker
        return worker


def start_cluster(
    model_dir: Path,
    *,
    prefill: int = 1,
    decode: int = 1,
    store_args: tuple[str, ...] = (),
    worker_args: tuple[str, ...] = ("--max-model-len", "1024"),
    proxy: Callable[[str, int], ProxyHook | None] | None = None,
    separate_gateway: bool = False,
    **config: Any,
) -> Iterator[Cluster]:
    """Store, ``prefill`` + ``decode`` workers and the gateway. ``proxy(role, i)``: the hook of
    the proxy worker ``i`` of ``role`` reaches the store through (None: directly). ``config``:
    GatewayConfig overrides, a group's as a dict of its fields (``replace_nested``).
    ``separate_gateway``: run the gateway as its own process (``python -m
    controlplane.gateway``, its defaults; no ``config``), e.g. to watch its memory alone."""
    ports = ("--port", str(free_port()), "--metadata-port", str(free_port()))
    store_args = ("--metadata", "embedded", *ports, *store_args)
    store = start_store(*store_args)
    metadata = store.metadata
    workers: list[Process] = []
    args_of: dict[str, tuple[str, ...]] = {}
    proxies: dict[str, FrameProxy] = {}
    all_proxies: list[FrameProxy] = []
    loop = LoopThread()
    server: GatewayServer | None = None
    cluster: Cluster | None = None
    try:
        roles = ["prefill"] * prefill + ["decode"] * decode
        plans: list[tuple[str, tuple[str, ...], FrameProxy | None]] = []
        for i, role in enumerate(roles):
            index = i if role == "prefill" else i - prefill
            hook = proxy(role, index) if proxy is not None else None
            via = FrameProxy(store.endpoint, on_request=hook) if hook is not None else None
            if via is not None:
                all_proxies.append(via)
            endpoint = via.endpoint if via is not None else store.endpoint
            args = (endpoint, "--kv-metadata", metadata, *worker_args, "--port", str(free_port()))
            plans.append((role, args, via))
        # The engines start at once (start-up is mostly waiting on this shared host).
        with ThreadPoolExecutor(len(plans)) as pool:
            futures = [pool.submit(start_worker, model_dir, r, *a) for r, a, _ in plans]
        failures = [f.exception() for f in futures if f.exception() is not None]
        for (role, args, via), future in zip(plans, futures, strict=True):
            if future.exception() is None:
                worker = future.result()
                workers.append(worker)
                args_of[worker.endpoint] = (role, *args)
                if via is not None:
                    proxies[worker.endpoint] = via
        if failures:
            raise RuntimeError(f"{len(failures)} worker(s) did not start") from failures[0]
        if separate_gateway:
            assert not config, "a separate gateway runs with its defaults"
            gateway = _start_gateway(model_dir, workers[:prefill], workers[prefill:], metadata)
            url = gateway.endpoint
            cluster = Cluster(
                loop,
                store,
                workers[:prefill],
                workers[prefill:],
                None,
                url,
                proxies,
                gateway=gateway,
            )
            cluster.model_dir, cluster.store_args = model_dir, store_args
            cluster.worker_args = args_of
            yield cluster
            return
        base = GatewayConfig(
            model_dir=model_dir,
            served_model_name=MODEL,
            prefill_endpoints=tuple(w.endpoint for w in workers[:prefill]),
            decode_endpoints=tuple(w.endpoint for w in workers[prefill:]),
            http=HttpConfig(port=0),
            routing=RoutingConfig(kv_metadata=metadata),
        )
        server = GatewayServer(
            replace_nested(base, **config), tokenizer=ModelTokenizer.from_model_dir(model_dir)
        )
        url = loop.run(server.start(), timeout_s=300)
        cluster = Cluster(loop, store, workers[:prefill], workers[prefill:], server, url, proxies)
        cluster.model_dir, cluster.store_args, cluster.worker_args = model_dir, store_args, args_of
        yield cluster
    finally:
        if cluster is not None:  # the processes now, restarted ones included
            workers, store = [*cluster.prefills, *cluster.decodes], cluster.store
        if server is not None:
            with contextlib.suppress(Exception):
                loop.run(server.stop(), timeout_s=60)
        if cluster is not None and cluster.gateway is not None:
            cluster.gateway.stop()
        loop.close()
        for worker in workers:
            if worker.proc.poll() is None:
                worker.stop()
        for via in all_proxies:
            via.close()
        store.stop()


def _start_gateway(
    model_dir: Path, prefills: list[Process], decodes: list[Process], metadata: str
) -> Process:
    argv = [sys.executable, "-m", "controlplane.gateway", "--model-dir", str(model_dir)]
    argv += ["--served-model-name", MODEL, "--host", "127.0.0.1", "--port", "0"]
    argv += ["--kv-metadata", metadata]
    for worker in prefills:
        argv += ["--prefill", worker.endpoint]
    for worker in decodes:
        argv += ["--decode", worker.endpoint]
    return spawn(argv, r"strata gateway listening on (\S+)", 300)


def kill_tree(process: Process) -> None:
    """SIGKILL a worker and every process below it (its engine), then reap it."""
    pids = descendants(process.proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.proc.wait(30)


def store_stats(endpoint: str) -> dict[str, Any]:
    """The store node's STATS (num_blocks, num_writing, num_leases, arena, ...)."""
    client = KVStoreClient(endpoint, timeout_s=10.0)
    try:
        return client.stats()
    finally:
        client.close()


def engine_blocks_in_use(workers: list[Process]) -> dict[str, tuple[int, int]]:
    """(blocks held by requests at its engine's last step, KV cache blocks) of each live
    worker, by endpoint (its Stats)."""
    held: dict[str, tuple[int, int]] = {}
    for worker in workers:
        if worker.proc.poll() is None:
            stats = stub(worker.endpoint).Stats(worker_pb2.StatsRequest(), timeout=30)
            held[worker.endpoint] = (stats.kv_blocks_in_use, stats.kv_cache_blocks)
    return held


def stop_server(server: StrataServer, timeout_s: float = 300.0) -> int:
    """Stop a `strata serve` with SIGTERM (a graceful stop takes a while on a loaded host), with
    SIGKILL if it has not ended after ``timeout_s``; its exit code."""
    try:
        return server.stop(timeout_s=timeout_s)
    except subprocess.TimeoutExpired:
        return server.stop(signal.SIGKILL)
