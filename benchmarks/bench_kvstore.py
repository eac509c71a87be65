"""Throughput of one kvstore node over TCP (and shared memory), beside this machine's limits.

Starts ``python -m kvstore.server`` on loopback, then measures, three runs each (min / median /
max), in the same process and the same minute:

* machine limits: ``np.copyto`` into a preallocated buffer (memory copy) and a raw blocking-socket
  loopback transfer received with ``recv_into`` into a preallocated buffer (1 MiB chunks), each
  measured three times before and three times after the kvstore runs (six samples that bracket
  them, since other work on the machine comes and goes);
* kvstore: ``put_many`` and ``get_many_into`` (pipelined, the connector's batch calls) for 256 KiB
  and 2 MiB blocks over TCP, and ``get_many_into`` over the shared-memory path.

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
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kvstore.client import PIPELINE_WINDOW, KVStoreClient, PutStatus  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
RUNS = 3


def summarize(samples: list[float]) -> str:
    return f"{min(samples):6.2f} / {statistics.median(samples):6.2f} / {max(samples):6.2f}"


def measure(fn: Callable[[], int]) -> list[float]:
    """Run ``fn`` (which returns bytes moved) RUNS times after one warm-up; GB/s per run."""
    fn()
    rates = []
    for _ in range(RUNS):
        started = time.perf_counter()
        nbytes = fn()
        rates.append(nbytes / (time.perf_counter() - started) / 1e9)
    return rates


def memcpy_limit(nbytes: int) -> list[float]:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    dst.fill(0)  # fault the pages in: the limit is for preallocated, touched memory

    def run() -> int:
        np.copyto(dst, src)
        return nbytes

    return measure(run)


def socket_limit(nbytes: int, chunk: int = MIB) -> list[float]:
    """Loopback TCP with blocking sockets: sendall of a reused buffer, recv_into a reused one."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    payload = memoryview(bytearray(os.urandom(chunk)))
    go = threading.Semaphore(0)
    stop = threading.Event()

    def sender() -> None:
        conn, _ = listener.accept()
        with conn:
            while go.acquire() and not stop.is_set():
                for _ in range(nbytes // chunk):
                    conn.sendall(payload)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    receiver = socket.create_connection(("127.0.0.1", port))
    sink = memoryview(bytearray(chunk))

    def run() -> int:
        go.release()
        left = (nbytes // chunk) * chunk
        while left:
            left -= receiver.recv_into(sink[: min(chunk, left)])
        return (nbytes // chunk) * chunk

    try:
        return measure(run)
    finally:
        stop.set()
        go.release()
        receiver.close()
        thread.join(5)
        listener.close()


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


def bench_store(endpoint: str, block_bytes: int, total_bytes: int) -> dict[str, list[float]]:
    num_blocks = max(1, total_bytes // block_bytes)
    blocks = [bytearray(os.urandom(block_bytes)) for _ in range(min(num_blocks, 8))]
    outs = [bytearray(block_bytes) for _ in range(num_blocks)]
    for out in outs:
        out[::4096] = b"\x00" * len(range(0, block_bytes, 4096))  # fault in: limits are "warm"
    generation = iter(range(1, 1 << 30))
    results: dict[str, list[float]] = {}
    with (
        KVStoreClient(endpoint, use_shm=False) as tcp,
        KVStoreClient(endpoint, use_shm=True) as shm,
    ):
        keys: list[bytes] = []

        def put_run() -> int:
            nonlocal keys
            tcp.delete(keys)
            gen = next(generation)
            keys = [(gen << 64 | i).to_bytes(16, "big") for i in range(num_blocks)]
            items = [(k, blocks[i % len(blocks)]) for i, k in enumerate(keys)]
            statuses = tcp.put_many(items)
            if any(s is not PutStatus.OK for s in statuses):
                raise RuntimeError(f"puts not stored: {set(statuses)}")
            return num_blocks * block_bytes

        results["put"] = measure(put_run)

        def get_run(client: KVStoreClient) -> Callable[[], int]:
            def run() -> int:
                sizes = client.get_many_into(keys, outs)
                if any(size != block_bytes for size in sizes):
                    raise RuntimeError("missing blocks")
                return num_blocks * block_bytes

            return run

        results["get"] = measure(get_run(tcp))
        shm.stats()  # connect; maps the arena if the node is local
        if shm.transport == "shm":
            results["get shm"] = measure(get_run(shm))
        if outs[-1] != blocks[(num_blocks - 1) % len(blocks)]:
            raise RuntimeError("data mismatch")
        tcp.delete(keys)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB per measurement")
    args = parser.parse_args()
    total = 64 * MIB if args.quick else 512 * MIB

    mode = "quick" if args.quick else "full"
    print(f"kvstore benchmark ({mode}): {total // MIB} MiB per run; GB/s min / median / max")
    print(f"host: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    memcpy = memcpy_limit(total)
    tcp_limit = socket_limit(total)

    results: dict[tuple[str, int], list[float]] = {}
    process, endpoint = start_node(2 * total + 64 * MIB)
    try:
        for block_bytes in (256 * KIB, 2 * MIB):
            for name, samples in bench_store(endpoint, block_bytes, total).items():
                results[name, block_bytes] = samples
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(30)
    memcpy += memcpy_limit(total)
    tcp_limit += socket_limit(total)

    print()
    print(f"machine limits ({len(memcpy)} runs: {RUNS} before and {RUNS} after the kvstore runs):")
    print(f"  memcpy, np.copyto into a preallocated buffer   {summarize(memcpy)}")
    print(f"  TCP loopback, blocking sockets + recv_into     {summarize(tcp_limit)}  (1 MiB)")
    print()
    window = f"put_many / get_many_into, {PIPELINE_WINDOW} in flight"
    print(f"kvstore node ({RUNS} runs each after a warm-up; {window}):")
    for (name, block_bytes), samples in results.items():
        limit, limit_name = (memcpy, "memcpy") if "shm" in name else (tcp_limit, "TCP")
        ratio = statistics.median(samples) / statistics.median(limit)
        label = f"{name} {block_bytes // KIB} KiB"
        print(f"  {label:<16} {summarize(samples)}   {ratio:4.0%} of the median {limit_name} limit")
    if status != 0:
        print(f"store node exited with status {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
