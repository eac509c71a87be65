"""Throughput and memory of the cluster-wide prefix index, beside this machine's dict limit.

Indexes 1 M blocks as 64-block chains (15,625 ``BlocksStored`` events from 16 holders over the
three tiers; random 16-byte keys, which is what xxh3_128 keys look like), then measures, three
runs each (min / median / max):

* insert: ``PrefixIndex.apply`` of all the events into a fresh index (blocks/s);
* match: ``PrefixIndex.match`` of whole indexed chains (block lookups/s = matches/s × 64), and
  the same plus the per-holder breakdown (``PrefixMatch.holders``);
* remove: ``apply`` of a ``BlocksRemoved`` per chain (blocks/s);
* the machine limit, measured in the same run on the same chains: a plain ``dict`` of the same
  1 M 16-byte keys and a Python loop of membership tests up to the first miss (the project's
  machine-limits note: "64-block prefix match against a dict of 1 M hashes: 4.4 M lookups/s");
* memory per indexed block: ``tracemalloc`` of building the index (numpy reports its arrays to
  tracemalloc) against building the ``dict[bytes, int]`` the limit uses (keys included: an index
  must keep them), once each, since they are deterministic;
* block keys: what a prompt's keys cost in hash format 2 (keyed BLAKE3) against format 1 (xxh3)
  and one bare xxh3 call per block (the limit of a Python loop of one hash call per block).

The machines are shared and noisy, so compare ratios, not absolute numbers.

    .venv/bin/python benchmarks/bench_index.py --quick     # 100 k blocks
    .venv/bin/python benchmarks/bench_index.py             # 1 M blocks
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import xxhash  # noqa: E402

from benchmarks.harness import dict_prefix_lookups  # noqa: E402
from kvstore.blocks.hashing import HASH_KEY_BYTES, block_keys, root_key  # noqa: E402
from kvstore.blocks.tier import Tier  # noqa: E402
from kvstore.cluster.events import BlocksRemoved, BlocksStored  # noqa: E402
from kvstore.cluster.index import PrefixIndex  # noqa: E402
from kvstore.cluster.match import ApplyResult  # noqa: E402

RUNS = 3
CHAIN = 64
BLOCK_TOKENS = 16
NUM_HOLDERS = 16


def summarize(samples: Sequence[float], scale: float = 1e6) -> str:
    values = [s / scale for s in samples]
    return f"{min(values):6.2f} / {statistics.median(values):6.2f} / {max(values):6.2f}"


def make_chains(num_blocks: int, seed: int = 0) -> list[tuple[bytes, ...]]:
    raw = np.random.default_rng(seed).bytes(16 * num_blocks)
    keys = [raw[i : i + 16] for i in range(0, len(raw), 16)]
    return [tuple(keys[i : i + CHAIN]) for i in range(0, num_blocks, CHAIN)]


def make_events(chains: Sequence[tuple[bytes, ...]]) -> list[BlocksStored]:
    events = []
    for j, chain in enumerate(chains):
        holder = j % NUM_HOLDERS
        events.append(BlocksStored(f"holder-{holder:02d}", j // NUM_HOLDERS, Tier(j % 3), chain))
    return events


def build(events: Sequence[BlocksStored]) -> PrefixIndex:
    index = PrefixIndex()
    for event in events:
        index.apply(event)
    return index


def rate(work: Callable[[], int]) -> float:
    """Units per second of one call of ``work`` (which returns how many units it did)."""
    gc.collect()
    started = time.perf_counter()
    units = work()
    return units / (time.perf_counter() - started)


def match_all(index: PrefixIndex, probes: Sequence[tuple[bytes, ...]], holders: bool) -> int:
    """Match every probe chain (and compute its holders); returns the block lookups done."""
    if holders:
        return sum(index.match(chain).holders[0].depth for chain in probes)
    return sum(index.match(chain).depth for chain in probes)


def traced_bytes(make: Callable[[], object]) -> tuple[int, object]:
    """Bytes still allocated after ``make()`` (tracemalloc), and what it made."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    made = make()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 k blocks instead of 1 M")
    args = parser.parse_args()
    num_blocks = 100_000 if args.quick else 1_000_000
    num_blocks -= num_blocks % CHAIN
    chains = make_chains(num_blocks)
    events = make_events(chains)
    next_seq = {e.source: e.seq + 1 for e in events}
    removals = []
    for e in events:
        removals.append(BlocksRemoved(e.source, next_seq[e.source], e.tier, e.keys))
        next_seq[e.source] += 1
    rng = np.random.default_rng(1)
    probes = [chains[i] for i in rng.integers(0, len(chains), size=min(5000, len(chains)))]
    table = {key: i for i, chain in enumerate(chains) for key in chain}

    print(
        f"prefix index benchmark ({'quick' if args.quick else 'full'}): {num_blocks:,} blocks "
        f"in {len(chains):,} chains of {CHAIN}, {NUM_HOLDERS} holders, 3 tiers; "
        f"{len(probes):,} matches per run"
    )
    print(f"host: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, numpy {np.__version__}")
    print(f"{RUNS} runs each, min / median / max\n")

    index = build(events)
    assert index.match(probes[0]).depth == CHAIN

    def insert_then_remove() -> tuple[float, float]:
        gc.collect()
        started = time.perf_counter()
        fresh = build(events)
        inserted = time.perf_counter()
        results = [fresh.apply(event) for event in removals]
        removed = time.perf_counter()
        if fresh.num_blocks or set(results) != {ApplyResult.APPLIED}:
            raise RuntimeError("removals did not empty the index")
        return num_blocks / (inserted - started), num_blocks / (removed - inserted)

    limit, inserts, matches, matches_holders, removes = [], [], [], [], []
    for _ in range(RUNS):
        limit.append(rate(lambda: dict_prefix_lookups(table, probes)))
        matches.append(rate(lambda: match_all(index, probes, holders=False)))
        matches_holders.append(rate(lambda: match_all(index, probes, holders=True)))
        insert_rate, remove_rate = insert_then_remove()
        inserts.append(insert_rate)
        removes.append(remove_rate)

    index_bytes, built = traced_bytes(lambda: build(events))
    assert isinstance(built, PrefixIndex)
    reported = built.memory_bytes()
    del built
    dict_bytes, _ = traced_bytes(
        lambda: {bytes(bytearray(k)): i for i, c in enumerate(chains) for k in c}
    )

    width = 44
    print(f"{'throughput (millions per second)':{width}} {'min / median / max':>24}")
    print(f"{'machine limit: dict prefix lookups':{width}} {summarize(limit):>24}")
    print(f"{'index match, block lookups':{width}} {summarize(matches):>24}")
    print(f"{'index match + holders, block lookups':{width}} {summarize(matches_holders):>24}")
    print(f"{'index insert (apply BlocksStored), blocks':{width}} {summarize(inserts):>24}")
    print(f"{'index remove (apply BlocksRemoved), blocks':{width}} {summarize(removes):>24}")
    ratio = statistics.median(matches) / statistics.median(limit)
    print(f"\nmatch / dict limit (medians): {ratio:.2f}   goal: >= 1 M block lookups/s")
    print("\nmemory per indexed block (tracemalloc, after building)")
    print(f"{'index (PrefixIndex)':{width}} {index_bytes / num_blocks:8.1f} B")
    print(f"{'index, memory_bytes() estimate':{width}} {reported / num_blocks:8.1f} B")
    print(f"{'dict[bytes, int] of the same keys':{width}} {dict_bytes / num_blocks:8.1f} B")
    print_block_keys(width)
    return 0


def print_block_keys(width: int) -> None:
    """What a prompt's block keys cost (the gateway computes them for every request, the
    connector for every load and save): keyed BLAKE3 (hash format 2), the unkeyed xxh3_128 chain
    of format 1, and the limit: one xxh3 call per block on the same bytes with no chaining."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 50_000, 1024).tolist() for _ in range(200)]
    hash_key = rng.bytes(HASH_KEY_BYTES)
    root = root_key(bytes(16), "bench", hash_key=hash_key)
    packed = [np.asarray(p, dtype="<u4").tobytes() for p in prompts]
    step = BLOCK_TOKENS * 4

    def v2() -> int:
        return sum(len(block_keys(p, BLOCK_TOKENS, root, hash_key)) for p in prompts)

    def v1() -> int:
        digest, count = xxhash.xxh3_128_digest, 0
        for data in packed:
            parent = root
            for start in range(0, len(data), step):
                parent = digest(parent + data[start : start + step])
                count += 1
        return count

    def limit() -> int:
        digest = xxhash.xxh3_128_digest
        return sum(1 for data in packed for s in range(0, len(data), step) if digest(data))

    samples: dict[str, list[float]] = {"limit": [], "v1": [], "v2": []}
    for _ in range(RUNS):
        samples["limit"].append(rate(limit))
        samples["v1"].append(rate(v1))
        samples["v2"].append(rate(v2))
    print(
        f"\nblock keys of 1024-token prompts, block {BLOCK_TOKENS} (millions of blocks per second)"
    )
    print(f"{'machine limit: one xxh3 call per block':{width}} {summarize(samples['limit']):>24}")
    print(f"{'format 1: xxh3_128 chain (unkeyed)':{width}} {summarize(samples['v1']):>24}")
    print(f"{'format 2: keyed BLAKE3 chain (block_keys)':{width}} {summarize(samples['v2']):>24}")
    per_prompt = 1024 // BLOCK_TOKENS / statistics.median(samples["v2"]) * 1e6
    print(f"format 2 per 1024-token prompt (median): {per_prompt:.1f} us")


if __name__ == "__main__":
    sys.exit(main())
