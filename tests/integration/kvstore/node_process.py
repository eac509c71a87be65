"""Real store nodes (``python -m kvstore.server``) on loopback: ``NodeProcess`` and the
``start_node`` fixture (the integration tests' conftest and the chaos suite import it from here)."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
READY_PREFIX = "kvstore node listening on "
METADATA_PREFIX = "kvstore metadata on "
METRICS_PREFIX = "kvstore metrics on "
START_TIMEOUT_S = 60.0  # generous: five helpers share two cores here


@dataclass
class NodeProcess:
    """A running store node: its process, endpoint and log."""

    process: subprocess.Popen[str]
    endpoint: str
    log_path: Path
    metadata: str | None = None
    """``strata://HOST:PORT`` of its gRPC metadata service (``--metadata embedded`` only)."""
    metrics: str | None = None
    """``HOST:PORT`` of its ``GET /metrics`` (``--metrics-port`` only)."""

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 10.0) -> int:
        """Signal the node and wait for it; returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def arena_files(self) -> list[str]:
        prefix = f"strata-kvstore-{self.process.pid}-"
        return [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


NodeFactory = Callable[..., NodeProcess]


def start_node_process(log_path: Path, *args: str) -> NodeProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    log = log_path.open("w")
    process = subprocess.Popen(
        # faulthandler: a node that does not become ready is sent SIGABRT first, so its log
        # says where it was stuck.
        [sys.executable, "-X", "faulthandler", "-m", "kvstore.server", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    log.close()
    assert process.stdout is not None
    lines = _pump_lines(process.stdout)
    deadline = time.monotonic() + START_TIMEOUT_S
    metadata: str | None = None
    metrics: str | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or process.poll() is not None:
            exited = process.poll()
            if exited is None:
                process.send_signal(signal.SIGABRT)  # faulthandler dumps every thread's stack
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
            process.wait()
            why = f"exited with {exited}" if exited is not None else "not ready in time"
            raise RuntimeError(f"store node did not start ({why}):\n{log_path.read_text()}")
        try:
            line = lines.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            continue
        if line.startswith(METADATA_PREFIX):  # printed before the ready line
            metadata = line[len(METADATA_PREFIX) :].strip()
        if line.startswith(METRICS_PREFIX):  # printed before the ready line
            metrics = line[len(METRICS_PREFIX) :].strip()
        if line.startswith(READY_PREFIX):
            endpoint = line[len(READY_PREFIX) :].strip()
            return NodeProcess(process, endpoint, log_path, metadata, metrics)


def _pump_lines(stream: IO[str]) -> queue.Queue[str]:
    """The lines of ``stream``, read on a thread until it ends or is closed. (A ``select`` on the
    pipe misses lines already in the file object's buffer: two lines printed together.)"""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        with contextlib.suppress(ValueError, OSError):  # closed by the test at teardown
            for line in stream:
                lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[NodeFactory]:
    """Factory: ``start_node("--arena-size", "8MiB", ...)`` starts a node on a free port.

    Every node it starts is stopped at teardown (SIGTERM, then SIGKILL if it hangs); a node still
    running then must exit 0 and leave no arena file behind.
    """
    nodes: list[NodeProcess] = []

    def factory(*args: str, port: int = 0) -> NodeProcess:
        defaults = ["--host", "127.0.0.1", "--port", str(port), "--arena-size", "32MiB"]
        node = start_node_process(tmp_path / f"node-{len(nodes)}.log", *defaults, *args)
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        running = node.process.poll() is None
        status = node.stop()
        if node.process.stdout is not None:
            node.process.stdout.close()
        if running:
            assert status == 0, node.log()
            assert node.arena_files() == []
        else:  # killed by the test: nothing could clean up after it
            for name in node.arena_files():
                os.unlink(os.path.join("/dev/shm", name))
