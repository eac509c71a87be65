"""Throughput of one kvstore node over TCP (and shared memory), beside this machine's limits.

Starts ``python -m kvstore.server`` on loopback, then measures, three runs each (min / median /
max), in the same process and the same minute:

* machine limits: ``np.copyto`` into a preallocated buffer (memory copy) and a raw blocking-socket
  loopback transfer received with ``recv_into`` into a preallocated buffer (1 MiB chunks), one
  run of the matching limit right before every kvstore run (other work on the machine comes and
  goes; the ratio is the median of kvstore run / the limit run just before it);
* kvstore: ``put_many`` and ``get_many_into`` (pipelined, the connector's batch calls) for 256 KiB
  and 2 MiB blocks over each transport this machine has -- TCP and shared memory (batched leases
  and reservations; RDMA cannot exist here) -- and ``AsyncKVStoreClient.put_many`` /
  ``get_many_into`` (one connection, uvloop) over TCP. TCP figures are compared with the
  raw-socket limit, shared-memory ones with memcpy.

The machines are shared and noisy, so compare the ratios (kvstore / limit), not absolute numbers.
The node and the client share the machine's cores, as a prefill worker and its local node would.

    .venv/bin/python benchmarks/bench_kvstore.py --quick     # ~64 MiB per measurement
    .venv/bin/python benchmarks/bench_kvstore.py             # ~512 MiB per measurement
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import uvloop  # noqa: E402

from kvstore.client.aio import AsyncKVStoreClient  # noqa: E402
from kvstore.client.sync import PIPELINE_WINDOW, KVStoreClient  # noqa: E402
from kvstore.wire.types import PutStatus  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
RUNS = 3


def summarize(samples: list[float]) -> str:
    return f"{min(samples):6.2f} / {statistics.median(samples):6.2f} / {max(samples):6.2f}"


@dataclass
class Paired:
    """Rates of one kvstore measurement and of its limit, each run right before it (GB/s)."""

    rates: list[float] = field(default_factory=list)
    limit_rates: list[float] = field(default_factory=list)

    def ratio(self) -> float:
        """Median over the runs of kvstore rate / the limit measured just before it."""
        return statistics.median(
            r / lim for r, lim in zip(self.rates, self.limit_rates, strict=True)
        )


def timed(fn: Callable[[], int]) -> float:
    started = time.perf_counter()
    nbytes = fn()
    return nbytes / (time.perf_counter() - started) / 1e9


def measure(
    fn: Callable[[], int], limit: Callable[[], int], prepare: Callable[[], object] | None = None
) -> Paired:
    """Run ``fn`` (which returns bytes moved) RUNS times after one warm-up, each run right after
    a run of ``limit``: on a shared machine the load changes from second to second, and a limit
    measured minutes apart says little about the run it is compared with. ``prepare`` runs
    untimed before each run (e.g. deleting the previous run's blocks)."""
    if prepare is not None:
        prepare()
    fn()
    paired = Paired()
    for _ in range(RUNS):
        if prepare is not None:
            prepare()
        paired.limit_rates.append(timed(limit))
        paired.rates.append(timed(fn))
    return paired


class MemcpyLimit:
    """``np.copyto`` between two preallocated, touched buffers of ``nbytes``."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._src = np.ones(nbytes, dtype=np.uint8)
        self._dst = np.empty_like(self._src)
        self._dst.fill(0)  # fault the pages in: the limit is for preallocated, touched memory

    def __call__(self) -> int:
        np.copyto(self._dst, self._src)
        return self.nbytes


class SocketLimit:
    """Loopback TCP with blocking sockets: sendall of a reused 1 MiB buffer from a thread,
    ``recv_into`` a reused one."""

    def __init__(self, nbytes: int, chunk: int = MIB) -> None:
        self.nbytes = (nbytes // chunk) * chunk
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        payload = memoryview(bytearray(os.urandom(chunk)))
        self._go = threading.Semaphore(0)
        self._stop = threading.Event()

        def sender() -> None:
            conn, _ = self._listener.accept()
            with conn:
                while self._go.acquire() and not self._stop.is_set():
                    for _ in range(self.nbytes // chunk):
                        conn.sendall(payload)

        self._thread = threading.Thread(target=sender, daemon=True)
        self._thread.start()
        self._receiver = socket.create_connection(("127.0.0.1", port))
        self._sink = memoryview(bytearray(chunk))

    def __call__(self) -> int:
        self._go.release()
        left = self.nbytes
        while left:
            left -= self._receiver.recv_into(self._sink[: min(self._sink.nbytes, left)])
        return self.nbytes

    def close(self) -> None:
        self._stop.set()
        self._go.release()
        self._receiver.close()
        self._thread.join(5)
        self._listener.close()


def start_node(arena_bytes: int) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvstore.server",
            "--port",
            "0",
            "--arena-size",
            str(arena_bytes),
            "--log-level",
            "WARNING",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 60)
    line = process.stdout.readline() if ready else ""
    prefix = "kvstore node listening on "
    if not line.startswith(prefix):
        process.kill()
        raise RuntimeError(f"store node did not start (got {line!r})")
    return process, line[len(prefix) :].strip()


def bench_store(
    endpoint: str, block_bytes: int, total_bytes: int, memcpy: MemcpyLimit, sockets: SocketLimit
) -> dict[str, Paired]:
    num_blocks = max(1, total_bytes // block_bytes)
    blocks = [bytearray(os.urandom(block_bytes)) for _ in range(min(num_blocks, 8))]
    outs = [bytearray(block_bytes) for _ in range(num_blocks)]
    for out in outs:
        out[::4096] = b"\x00" * len(range(0, block_bytes, 4096))  # fault in: limits are "warm"
    generation = iter(range(1, 1 << 30))
    results: dict[str, Paired] = {}
    keys: list[bytes] = []

    def new_keys() -> list[tuple[bytes, bytearray]]:
        nonlocal keys
        gen = next(generation)
        keys = [(gen << 64 | i).to_bytes(16, "big") for i in range(num_blocks)]
        return [(k, blocks[i % len(blocks)]) for i, k in enumerate(keys)]

    def check_data() -> None:
        if outs[-1] != blocks[(num_blocks - 1) % len(blocks)]:
            raise RuntimeError("data mismatch")
        outs[-1][:1] = b"\xff" if outs[-1][:1] != b"\xff" else b"\x00"  # next run must rewrite

    with (
        KVStoreClient(endpoint, use_shm=False) as tcp,
        KVStoreClient(endpoint, use_shm=True) as shm,
    ):
        for name, client in (("tcp", tcp), ("shm", shm)):
            client.stats()  # connect; picks the transport
            if client.transport != name:
                print(f"  ({name} unavailable: {client.skipped_transports})")
                continue

            def put_run(client: KVStoreClient = client) -> int:
                statuses = client.put_many(new_keys())
                if any(s is not PutStatus.OK for s in statuses):
                    raise RuntimeError(f"puts not stored: {set(statuses)}")
                return num_blocks * block_bytes

            def get_run(client: KVStoreClient = client) -> int:
                sizes = client.get_many_into(keys, outs)
                if any(size != block_bytes for size in sizes):
                    raise RuntimeError("missing blocks")
                check_data()
                return num_blocks * block_bytes

            limit = memcpy if name == "shm" else sockets
            results[f"put {name}"] = measure(put_run, limit, lambda: tcp.delete(keys))
            results[f"get {name}"] = measure(get_run, limit)

        async def async_runs() -> None:
            async with AsyncKVStoreClient(endpoint) as client:

                async def put_run() -> int:
                    statuses = await client.put_many(new_keys())
                    if any(status is not PutStatus.OK for status in statuses):
                        raise RuntimeError("puts not stored")
                    return num_blocks * block_bytes

                async def get_run() -> int:
                    sizes = await client.get_many_into(keys, outs)
                    if any(nbytes != block_bytes for nbytes in sizes):
                        raise RuntimeError("missing blocks")
                    check_data()
                    return num_blocks * block_bytes

                results["put tcp async"] = await measure_async(
                    put_run, sockets, lambda: client.delete(keys)
                )
                results["get tcp async"] = await measure_async(get_run, sockets)

        uvloop.run(async_runs())
        tcp.delete(keys)
    return results


async def measure_async(
    fn: Callable[[], Awaitable[int]],
    limit: Callable[[], int],
    prepare: Callable[[], Awaitable[object]] | None = None,
) -> Paired:
    """:func:`measure` for a coroutine function."""
    if prepare is not None:
        await prepare()
    await fn()
    paired = Paired()
    for _ in range(RUNS):
        if prepare is not None:
            await prepare()
        paired.limit_rates.append(timed(limit))
        started = time.perf_counter()
        nbytes = await fn()
        paired.rates.append(nbytes / (time.perf_counter() - started) / 1e9)
    return paired


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB per measurement")
    args = parser.parse_args()
    total = 64 * MIB if args.quick else 512 * MIB

    mode = "quick" if args.quick else "full"
    print(f"kvstore benchmark ({mode}): {total // MIB} MiB per run; GB/s min / median / max")
    print(f"host: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    memcpy = MemcpyLimit(total)
    sockets = SocketLimit(total)
    results: dict[tuple[str, int], Paired] = {}
    process, endpoint = start_node(2 * total + 64 * MIB)
    try:
        for block_bytes in (256 * KIB, 2 * MIB):
            for name, paired in bench_store(endpoint, block_bytes, total, memcpy, sockets).items():
                results[name, block_bytes] = paired
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(30)
        sockets.close()

    all_memcpy = [r for (n, _), p in results.items() if "shm" in n for r in p.limit_rates]
    all_tcp = [r for (n, _), p in results.items() if "shm" not in n for r in p.limit_rates]
    print()
    print("machine limits (every run, each measured right before a kvstore run):")
    print(f"  memcpy, np.copyto into a preallocated buffer   {summarize(all_memcpy)}")
    print(f"  TCP loopback, blocking sockets + recv_into     {summarize(all_tcp)}  (1 MiB)")
    print()
    window = f"put_many / get_many_into, {PIPELINE_WINDOW} in flight over TCP"
    print(f"kvstore node ({RUNS} runs each after a warm-up; {window}):")
    print(f"  {'':<22} {'kvstore min / med / max':>24}   {'limit (median)':>14}   ratio")
    for (name, block_bytes), paired in results.items():
        limit_name = "memcpy" if "shm" in name else "TCP"
        limit_median = statistics.median(paired.limit_rates)
        label = f"{name} {block_bytes // KIB} KiB"
        print(
            f"  {label:<22} {summarize(paired.rates)}   {limit_median:6.2f} {limit_name:<7}"
            f"   {paired.ratio():4.0%}"
        )
    if status != 0:
        print(f"store node exited with status {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
