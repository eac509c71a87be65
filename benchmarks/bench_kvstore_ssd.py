"""Throughput of the kvstore SSD tier (lmdb) beside this disk's sequential limits, same run.

Measures, three runs each (min / median / max GB/s), in one process:

* disk limits, on the same filesystem as the tier: a sequential write of the run's size from a
  preallocated buffer in 16 MiB ``write`` calls followed by one ``fsync`` (what a durable bulk
  write costs); a cold sequential read (``posix_fadvise(DONTNEED)`` first) with ``readv`` into a
  preallocated buffer; random ``O_DIRECT`` reads of one block size from 8 threads (what a cache
  that reads blocks in any order can get from this disk); ``np.copyto`` for warm reads;
* the SSD tier (:class:`kvstore.node.ssd.tier.SSDTier`, as a store node runs it: ``put_many``
  batches of ``max_batch_bytes`` per transaction, one ``fdatasync`` per commit with the default
  ``--ssd-sync data``; ``read_into`` a preallocated destination with checksum verification) for
  256 KiB and 2 MiB blocks: puts (also ``sync=none`` for comparison); cold reads (the file dropped
  from the page cache) in write order and in random order, from 8 threads (the node's read
  pool; a prefix spilled together lies in write order); warm reads from one thread.

Goal: SSD-tier puts and cold reads at >= 70 % of the disk's sequential write / read.

    .venv/bin/python benchmarks/bench_kvstore_ssd.py --quick   # 256 MiB per run
    .venv/bin/python benchmarks/bench_kvstore_ssd.py           # 1 GiB per run
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kvstore.blocks.format import BLOCK_HEADER_BYTES, encode_header  # noqa: E402
from kvstore.node.ssd.files import tune_malloc_for_lmdb  # noqa: E402
from kvstore.node.ssd.tier import SSDTier  # noqa: E402
from kvstore.node.ssd.types import ReadStatus  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
RUNS = 3
CHUNK = 16 * MIB


def summarize(samples: list[float]) -> str:
    return f"{min(samples):6.2f} / {statistics.median(samples):6.2f} / {max(samples):6.2f}"


def drop_cache(path: str) -> None:
    """Evict a file's pages from the page cache (written back first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_limits(directory: str, total: int) -> tuple[list[float], list[float]]:
    """Sequential write (+fsync) and cold sequential read of ``total`` bytes, RUNS times each."""
    buf = np.frombuffer(os.urandom(MIB) * (CHUNK // MIB), dtype=np.uint8).copy()
    path = os.path.join(directory, "seq.bin")
    writes, reads = [], []
    for _ in range(RUNS):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        started = time.perf_counter()
        for _ in range(total // CHUNK):
            os.write(fd, buf)
        os.fsync(fd)
        writes.append(total / (time.perf_counter() - started) / 1e9)
        os.close(fd)
        drop_cache(path)
        fd = os.open(path, os.O_RDONLY)
        started = time.perf_counter()
        while os.readv(fd, [buf]) > 0:
            pass
        reads.append(total / (time.perf_counter() - started) / 1e9)
        os.close(fd)
    os.unlink(path)
    return writes, reads


def random_read_limit(
    directory: str, block_bytes: int, total: int, threads: int = 8
) -> list[float]:
    """Random O_DIRECT reads of half the blocks of a ``total``-byte file, from ``threads``."""
    path = os.path.join(directory, "rand.bin")
    chunk = os.urandom(CHUNK)
    with open(path, "wb") as f:
        for _ in range(total // CHUNK):
            f.write(chunk)
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buffers = [mmap.mmap(-1, block_bytes) for _ in range(threads)]  # page-aligned
    rates = []
    for run in range(RUNS):
        blocks = random.Random(run).sample(range(total // block_bytes), total // block_bytes // 2)

        def worker(i: int, blocks: list[int] = blocks) -> None:
            for n in blocks[i::threads]:
                os.preadv(fd, [buffers[i]], n * block_bytes)

        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(worker, range(threads)))
        rates.append(len(blocks) * block_bytes / (time.perf_counter() - started) / 1e9)
    os.close(fd)
    os.unlink(path)
    return rates


def memcpy_limit(nbytes: int) -> list[float]:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)
    rates = []
    for _ in range(RUNS):
        started = time.perf_counter()
        np.copyto(dst, src)
        rates.append(nbytes / (time.perf_counter() - started) / 1e9)
    return rates


def make_blocks(block_bytes: int, count: int, generation: int) -> list[tuple[bytes, bytes]]:
    """``count`` distinct keys over one shared payload (the tier does not care), with headers."""
    payload = np.random.default_rng(block_bytes).integers(
        0, 256, block_bytes - BLOCK_HEADER_BYTES, dtype=np.uint8
    )
    blocks = []
    for n in range(count):
        key = (generation << 64 | n).to_bytes(16, "big")
        blocks.append((key, encode_header(key, payload) + payload.tobytes()))
    return blocks


def bench_tier(directory: str, block_bytes: int, total: int, sync: str) -> dict[str, list[float]]:
    """Per run: a fresh tier; put everything; cold reads in order, then in random order; warm."""
    count = total // block_bytes
    capacity = 2 * total + 64 * MIB
    results: dict[str, list[float]] = {"put": [], "cold_seq": [], "cold_rand": [], "warm": []}
    dests = [np.zeros(block_bytes, dtype=np.uint8) for _ in range(8)]

    def read_all(tier: SSDTier, keys: list[bytes], threads: int) -> float:
        def worker(part: int) -> None:
            dest = memoryview(dests[part])
            for key in keys[part::threads]:
                assert tier.read_into(key, dest).status is ReadStatus.OK

        started = time.perf_counter()
        if threads == 1:
            worker(0)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(worker, range(threads)))
        return count * block_bytes / (time.perf_counter() - started) / 1e9

    def reopen_cold(path: str) -> SSDTier:
        drop_cache(os.path.join(path, "data.mdb"))
        return SSDTier(path, capacity, sync=sync)

    for run in range(RUNS + 1):  # the first run is a warm-up, not reported
        path = os.path.join(directory, f"tier-{block_bytes}-{sync}-{run}")
        blocks = make_blocks(block_bytes, count, run + 1)
        keys = [key for key, _ in blocks]
        tier = SSDTier(path, capacity, sync=sync)
        batch = max(1, tier.max_batch_bytes // block_bytes)
        started = time.perf_counter()
        for i in range(0, count, batch):
            assert all(tier.put_many(blocks[i : i + batch]))
        put_rate = count * block_bytes / (time.perf_counter() - started) / 1e9
        tier.close()
        tier = reopen_cold(path)
        cold_seq = read_all(tier, keys, 8)
        tier.close()
        tier = reopen_cold(path)
        cold_rand = read_all(tier, random.Random(run).sample(keys, len(keys)), 8)
        warm = read_all(tier, keys, 1)
        tier.close()
        shutil.rmtree(path)
        if run:
            results["put"].append(put_rate)
            results["cold_seq"].append(cold_seq)
            results["cold_rand"].append(cold_rand)
            results["warm"].append(warm)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB per run instead of 1 GiB")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    total = (256 if args.quick else 1024) * MIB
    tuned = tune_malloc_for_lmdb()
    mode = "quick" if args.quick else "full"
    print(
        f"kvstore SSD tier benchmark ({mode}): {total // MIB} MiB per run; GB/s min / median / max"
    )
    rows: list[tuple[str, list[float], list[float], str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-kvstore-ssd-", dir=args.dir) as directory:
        print(f"dir {directory} (tier and limits on the same filesystem); malloc tuned: {tuned}")
        print()
        print(f"machine limits ({RUNS} runs):")
        write_limit, read_limit = disk_limits(directory, total)
        print(f"  disk sequential write, 16 MiB writes + fsync   {summarize(write_limit)}")
        print(f"  disk sequential read, cold (fadvise DONTNEED)  {summarize(read_limit)}")
        memcpy = memcpy_limit(64 * MIB)
        print(f"  memcpy, np.copyto 64 MiB preallocated          {summarize(memcpy)}")
        for block_bytes in (256 * KIB, 2 * MIB):
            label = (
                f"{block_bytes // KIB} KiB" if block_bytes < MIB else f"{block_bytes // MIB} MiB"
            )
            rand_limit = random_read_limit(directory, block_bytes, total)
            print(f"  disk random {label:<7} reads, O_DIRECT, 8 thr   {summarize(rand_limit)}")
            data = bench_tier(directory, block_bytes, total, "data")
            nosync = bench_tier(directory, block_bytes, total, "none")
            rows += [
                (f"{label} put (sync=data)", data["put"], write_limit, "seq. write"),
                (f"{label} put (sync=none)", nosync["put"], write_limit, "seq. write"),
                (f"{label} get cold, in order, 8 thr", data["cold_seq"], read_limit, "seq. read"),
                (f"{label} get cold, random, 8 thr", data["cold_rand"], read_limit, "seq. read"),
                ("", data["cold_rand"], rand_limit, f"random {label} read"),
                (f"{label} get warm, 1 thr", data["warm"], memcpy, "memcpy"),
            ]
    print()
    print(
        f"SSD tier ({RUNS} runs each after a warm-up; verified reads into a preallocated buffer):"
    )
    for name, samples, limit, limit_name in rows:
        ratio = statistics.median(samples) / statistics.median(limit)
        figures = summarize(samples) if name else " " * len(summarize(samples))
        print(
            f"  {name:<32} {figures}   {ratio:4.0%} of the median disk {limit_name}"
            if limit_name != "memcpy"
            else f"  {name:<32} {figures}   {ratio:4.0%} of the median memcpy"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
