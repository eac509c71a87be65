"""A disaggregated cluster of `strata.supervisor.Service` processes on loopback: one store node,
workers of the given roles (each engine on its own cores, as `strata serve` does) and a gateway
with static ``--prefill`` / ``--decode`` endpoints. For the end-to-end and chaos tests that signal
or kill the processes themselves (tests/e2e/test_failover.py, tests/chaos/test_engine_stall.py).

``service_cluster(...)`` is a generator (``yield from`` it in a fixture); every process it
started is stopped when it is closed (SIGCONT first, for a test that left one stopped), also
after a failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from strata.cli import engine_core_sets
from strata.supervisor import Service
from tests.e2e.conftest import free_port
from tests.proc_tree import descendants

READY_TIMEOUT_S = 600.0
HOST = "127.0.0.1"


@dataclass
class ServiceCluster:
    gateway_url: str
    workers: list[tuple[str, str, Service]]
    """(role, endpoint, service) of each worker, in the order asked for."""
    services: list[Service]
    """Every process, in start order (store, workers, gateway)."""

    def of_role(self, role: str) -> dict[str, Service]:
        """The workers of ``role`` by endpoint."""
        return {endpoint: s for r, endpoint, s in self.workers if r == role}


def signal_tree(service: Service, sig: int, *, engine_only: bool = False) -> None:
    """``sig`` to every process of a worker (vLLM's engine core and executor included), or with
    ``engine_only`` to the engine's processes only (the gRPC server keeps answering)."""
    assert service.proc is not None
    pids = descendants(service.proc.pid)
    if not engine_only:
        pids.add(service.proc.pid)
    for pid in sorted(pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def service_cluster(
    model_dir: Path,
    roles: Sequence[str],
    *,
    store_args: Sequence[str] = (),
    worker_args: Sequence[str] = (),
    gateway_args: Sequence[str] = (),
) -> Iterator[ServiceCluster]:
    py = sys.executable
    services: list[Service] = []

    def start(service: Service) -> Service:
        services.append(service)
        service.start()
        return service

    try:
        store_port = free_port()
        argv = [py, "-m", "kvstore.server", "--host", HOST, "--port", str(store_port), *store_args]
        start(Service("store", argv, r"listening on")).wait_ready(READY_TIMEOUT_S)
        workers: list[tuple[str, str, Service]] = []
        for role, cores in zip(roles, engine_core_sets(len(roles)), strict=True):
            port = free_port()
            argv = [py, "-m", "dataplane.worker", "--role", role, "--model", str(model_dir)]
            argv += ["--store", f"{HOST}:{store_port}", "--host", HOST, "--port", str(port)]
            argv += worker_args
            env = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores))}
            service = start(Service(f"{role}-{port}", argv, r"strata worker ready", env=env))
            workers.append((role, f"{HOST}:{port}", service))
        for _, _, service in workers:
            service.wait_ready(READY_TIMEOUT_S)
        gateway_port = free_port()
        argv = [py, "-m", "controlplane.gateway", "--model-dir", str(model_dir)]
        argv += ["--served-model-name", "tiny", "--host", HOST, "--port", str(gateway_port)]
        for role, endpoint, _ in workers:
            argv += [f"--{role}", endpoint]
        argv += gateway_args
        start(Service("gateway", argv, r"listening on")).wait_ready(READY_TIMEOUT_S)
        yield ServiceCluster(f"http://{HOST}:{gateway_port}", workers, services)
    finally:
        for service in reversed(services):
            if service.proc is not None and service.proc.poll() is None:
                signal_tree(service, signal.SIGCONT)
            service.stop(20.0)
