"""What the benchmarks share: child servers in their own sessions, HTTP polling, host facts,
percentiles, and the machine limits measured beside a figure (loopback TCP, a ``dict`` prefix
match).

Imported by the benchmark scripts (`from benchmarks.harness import ...`, the repository root on
``sys.path``); standard library only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_pids(sid: int) -> list[int]:
    """Every live process in session ``sid`` (the servers' whole trees: they start their own
    process groups, but stay in the session this script gave them)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        # after "pid (comm)": state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


@dataclass
class Server:
    """A child process in its own session; its output goes to a log file and is scanned."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    lines: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> None:
        log(f"starting {self.name}: {' '.join(self.argv)}")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
            cwd=REPO,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with self.log_path.open("w") as f:
            for raw in iter(self.proc.stdout.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                f.write(line + "\n")
                f.flush()
                with self.changed:
                    self.lines.append(line)
                    self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float, count: int = 1) -> list[str]:
        """The first ``count`` lines matching ``pattern``; raises on timeout or exit."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                hits = [line for line in self.lines if pattern.search(line)]
                if len(hits) >= count:
                    return hits[:count]
                if not self.alive():
                    raise RuntimeError(
                        f"{self.name} exited (code {self.proc and self.proc.poll()})"
                        f"; last lines:\n" + "\n".join(self.lines[-30:])
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{self.name}: no {pattern.pattern!r} x{count} within {timeout_s:.0f} s"
                    )
                self.changed.wait(min(left, 1.0))

    def stop(self, grace_s: float = 90.0) -> None:
        """SIGTERM to the process group, wait, then SIGKILL everything left in the session."""
        if self.proc is None:
            return
        sid = self.proc.pid  # start_new_session: the child leads its session and group
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {grace_s:.0f} s: SIGKILL")
        deadline = time.monotonic() + 15.0
        while (left := session_pids(sid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in session_pids(sid):
            log(f"{self.name}: killing leftover pid {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        time.sleep(1.0)
        left = session_pids(sid)
        if left:
            raise RuntimeError(f"{self.name}: processes left after stop: {left}")
        log(f"{self.name} stopped (code {self.proc.returncode}), no process left")


def http_json(url: str, body: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def wait_http_ok(url: str, server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"{server.name} exited; last lines:\n" + "\n".join(server.lines[-30:])
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} not ready within {timeout_s:.0f} s")


def host_info() -> dict[str, Any]:
    model, flags = "?", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"]
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "flags": {f: f in flags for f in wanted},
        "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "kernel": platform.release(),
    }


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(values: Sequence[float], q: float) -> float:
    """Percentile with linear interpolation (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ks_two_sample(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test: the statistic D (largest gap between the two
    empirical CDFs) and its p-value under "same distribution", from the asymptotic Kolmogorov
    distribution with Stephens' small-sample correction (accurate for ``n·m/(n+m)`` >= 4)."""
    if not a or not b:
        raise ValueError("both samples need values")
    xs, ys = sorted(a), sorted(b)
    n, m = len(xs), len(ys)
    i = j = 0
    gap = 0.0
    while i < n and j < m:
        value = min(xs[i], ys[j])
        while i < n and xs[i] == value:
            i += 1
        while j < m and ys[j] == value:
            j += 1
        gap = max(gap, abs(i / n - j / m))
    effective = math.sqrt(n * m / (n + m))
    return gap, kolmogorov_q((effective + 0.12 + 0.11 / effective) * gap)


def kolmogorov_q(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution: ``2 Σ (-1)^(k-1) exp(-2 k² x²)``."""
    if x < 0.2:
        return 1.0  # the series converges slowly there; the tail probability is 1 to 1e-9
    total = 0.0
    for k in range(1, 101):
        term = 2.0 * (-1) ** (k - 1) * math.exp(-2.0 * k * k * x * x)
        total += term
        if abs(term) < 1e-16:
            break
    return min(1.0, max(0.0, total))


def dict_prefix_lookups(table: dict[bytes, int], chains: Sequence[tuple[bytes, ...]]) -> int:
    """Membership tests of each chain's keys in ``table`` up to its first miss; returns how many
    were done (the bare-``dict`` limit of a prefix match)."""
    lookups = 0
    for chain in chains:
        for key in chain:
            lookups += 1
            if key not in table:
                break
    return lookups


def loopback_bandwidth_gbps(total_bytes: int, chunk_bytes: int = 1 << 20) -> float:
    """One run: `total_bytes` over 127.0.0.1, blocking sockets, `recv_into` a reused buffer.

    The clock runs from the first send to the receiver's one-byte acknowledgement of the last byte.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                buf = bytearray(chunk_bytes)
                view = memoryview(buf)
                got = 0
                while got < total_bytes:
                    n = conn.recv_into(view, min(chunk_bytes, total_bytes - got))
                    if n == 0:
                        raise ConnectionError("sender closed early")
                    got += n
                conn.sendall(b"k")
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    payload = memoryview(bytearray(os.urandom(1024)) * (chunk_bytes // 1024))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        t0 = time.perf_counter()
        sent = 0
        while sent < total_bytes:
            n = min(chunk_bytes, total_bytes - sent)
            sock.sendall(payload[:n])
            sent += n
        if sock.recv(1) != b"k":
            raise ConnectionError("no acknowledgement")
        elapsed = time.perf_counter() - t0
    thread.join()
    listener.close()
    if errors:
        raise errors[0]
    return total_bytes / elapsed / 1e9
