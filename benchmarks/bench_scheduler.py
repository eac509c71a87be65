"""Scheduling decision time, per policy, with 1 M indexed blocks and 64 / 256 instances.

Setup (deterministic, seeded):

* a :class:`kvstore.cluster.index.PrefixIndex` of 1 M blocks as 64-block chains (random 16-byte
  keys, as xxh3_128 keys look): every chain on one of 16 store nodes (DRAM or SSD), and every
  fourth chain also resident, in its first 16..64 blocks, in the HBM of one instance (one holder
  per instance: 64 or 256 engine holders besides the 16 store nodes);
* 64 or 256 ready instances, half prefill, half decode, 8 per host, each with its own
  :class:`LatencyPredictor` and a random load (queued prefill tokens, running decodes);
* requests: an indexed chain cut at a random depth (1..64 blocks) plus 0..8 fresh blocks and a
  partial block (so prompts are 16..1,160 tokens, usually partly cached), 1..256 output tokens,
  a TTFT SLO of 100, 300 or 1,000 ms (a third each) and a TPOT SLO of 20 ms: slo_aware
  rejects most of the 100 ms ones (every prefill instance has >= 1,024 tokens queued) and admits
  the others, so both paths are timed; the other policies ignore SLOs.

One **decision** is what the gateway does per request once the prompt is hashed: match the key
chain in the index, split the match into pool and HBM runs (:func:`cached_prefix`), build the
:class:`RequestSnapshot`, and call ``policy.decide``. Its time is measured per request
(``perf_counter_ns``, after a warm-up), three runs of ``--decisions`` requests each; the table
shows p50 / p99 of all runs together and, in brackets, of ``decide`` alone.

The machine limit printed beside it, measured in the same run on the same chains: a bare ``dict``
of the 1 M keys and a Python loop of membership tests up to the first miss (../shared/notes/
machine-limits.md: "64-block prefix match against a dict of 1 M hashes: 4.4 M lookups/s"),
as lookups/s and as the time of one 64-block prefix match.

``--gc-freeze`` moves everything built during set-up (1 M keys) out of the garbage collector's
reach, as a gateway can after start-up, to tell collector pauses from CPU contention in the p99.

    .venv/bin/python benchmarks/bench_scheduler.py --quick     # 100 k blocks, 1,000 decisions
    .venv/bin/python benchmarks/bench_scheduler.py             # 1 M blocks, 5,000 decisions
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import dict_prefix_lookups, percentile  # noqa: E402
from controlplane.instances.types import InstanceState  # noqa: E402
from controlplane.scheduling import (  # noqa: E402
    POLICY_NAMES,
    Assign,
    InstanceLoad,
    InstanceSnapshot,
    LatencyPredictor,
    RequestSnapshot,
    SchedulingConfig,
    cached_prefix,
    make_policy,
)
from controlplane.workers.roles import WorkerRole  # noqa: E402
from kvstore.blocks.tier import Tier  # noqa: E402
from kvstore.cluster.events import BlocksStored  # noqa: E402
from kvstore.cluster.index import PrefixIndex  # noqa: E402

CHAIN = 64
BLOCK = 16
NUM_STORE_NODES = 16
INSTANCES_PER_HOST = 8
RUNS = 3
WARMUP = 200
TTFT_SLOS_S = (0.1, 0.3, 1.0)
TPOT_SLO_S = 0.020


def make_chains(num_blocks: int, rng: np.random.Generator) -> list[tuple[bytes, ...]]:
    raw = rng.bytes(16 * num_blocks)
    keys = [raw[i : i + 16] for i in range(0, len(raw), 16)]
    return [tuple(keys[i : i + CHAIN]) for i in range(0, num_blocks, CHAIN)]


def build_index(
    chains: Sequence[tuple[bytes, ...]], instance_ids: Sequence[str], rng: np.random.Generator
) -> PrefixIndex:
    index = PrefixIndex(initial_capacity=len(chains) * CHAIN)
    seqs: dict[str, int] = {}

    def store(source: str, tier: Tier, keys: tuple[bytes, ...]) -> None:
        seq = seqs.get(source, 0)
        index.apply(BlocksStored(source, seq, tier, keys))
        seqs[source] = seq + 1

    for j, chain in enumerate(chains):
        store(f"node-{j % NUM_STORE_NODES:02d}", Tier.DRAM if j % 3 else Tier.SSD, chain)
        if j % 4 == 0:
            engine = instance_ids[int(rng.integers(len(instance_ids)))]
            store(engine, Tier.HBM, chain[: int(rng.integers(16, CHAIN + 1))])
    return index


def make_instances(count: int, rng: np.random.Generator) -> list[InstanceSnapshot]:
    instances = []
    for i in range(count):
        prefill = i % 2 == 0
        running = 0 if prefill else int(rng.integers(0, 64))
        queued = int(rng.integers(1024, 16384)) if prefill else int(rng.integers(0, 512))
        load = InstanceLoad(
            queued_prefill_tokens=queued,
            queued_prefill_requests=max(1, queued // 1024) if queued else 0,
            running_decodes=running,
            decode_context_tokens=running * int(rng.integers(256, 4096)),
            remaining_decode_tokens=running * int(rng.integers(16, 512)),
        )
        instances.append(
            InstanceSnapshot(
                id=f"inst-{i:03d}",
                role=WorkerRole.PREFILL if prefill else WorkerRole.DECODE,
                state=InstanceState.READY,
                predictor=LatencyPredictor(),
                load=load,
                capacity=256,
                host=f"host-{i // INSTANCES_PER_HOST:02d}",
            )
        )
    return instances


def make_requests(
    chains: Sequence[tuple[bytes, ...]], count: int, rng: np.random.Generator
) -> list[tuple[tuple[bytes, ...], int, int, float]]:
    """(key chain, prompt tokens, max tokens, TTFT SLO) per request."""
    requests = []
    fresh = rng.bytes(16 * 8 * count)
    for r in range(count):
        chain = chains[int(rng.integers(len(chains)))]
        depth = int(rng.integers(1, CHAIN + 1))
        extra = int(rng.integers(0, 9))
        new_keys = tuple(fresh[(8 * r + k) * 16 : (8 * r + k + 1) * 16] for k in range(extra))
        keys = chain[:depth] + new_keys
        tokens = BLOCK * len(keys) + int(rng.integers(0, BLOCK))
        slo = TTFT_SLOS_S[r % len(TTFT_SLOS_S)]
        requests.append((keys, tokens, int(rng.integers(1, 257)), slo))
    return requests


def percentile_us(samples: Sequence[int], q: float) -> float:
    return percentile(samples, q) / 1e3  # ns -> µs


def time_decisions(
    policy_name: str,
    index: PrefixIndex,
    instances: Sequence[InstanceSnapshot],
    requests: Sequence[tuple[tuple[bytes, ...], int, int, float]],
) -> tuple[list[int], list[int], int]:
    """Per-request total and decide-only times (ns) over RUNS runs, and the accepted count."""
    policy = make_policy(policy_name, SchedulingConfig())
    engine_ids = frozenset(i.id for i in instances)
    clock = time.perf_counter_ns
    total: list[int] = []
    decide: list[int] = []
    accepted = 0
    for run in range(RUNS + 1):
        batch = requests[:WARMUP] if run == 0 else requests
        for keys, tokens, max_tokens, ttft_slo_s in batch:
            started = clock()
            prefix = cached_prefix(index.match(keys), engine_ids)
            request = RequestSnapshot(tokens, max_tokens, BLOCK, prefix, ttft_slo_s, TPOT_SLO_S)
            deciding = clock()
            decision = policy.decide(request, instances)
            done = clock()
            if run:
                total.append(done - started)
                decide.append(done - deciding)
                accepted += isinstance(decision, Assign)
    return total, decide, accepted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 k blocks, 1,000 decisions")
    parser.add_argument("--decisions", type=int, default=None, help="requests per run")
    parser.add_argument("--instances", type=int, nargs="+", default=[64, 256], help="cluster sizes")
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() after setup, as a gateway would after start-up (see the docstring)",
    )
    args = parser.parse_args()
    num_blocks = 100_000 if args.quick else 1_000_000
    num_blocks -= num_blocks % CHAIN
    num_decisions = args.decisions or (1_000 if args.quick else 5_000)

    rng = np.random.default_rng(0)
    chains = make_chains(num_blocks, rng)
    requests = make_requests(chains, num_decisions, rng)
    print(
        f"scheduler benchmark ({'quick' if args.quick else 'full'}): {num_blocks:,} indexed "
        f"blocks in {len(chains):,} chains of {CHAIN}; {num_decisions:,} decisions x {RUNS} runs "
        f"per policy and cluster size"
    )
    print(f"host: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, numpy {np.__version__}")

    table = {key: i for i, chain in enumerate(chains) for key in chain}
    probes = [keys for keys, *_ in requests]
    full_chains = [chains[i] for i in rng.integers(0, len(chains), size=len(requests))]
    limit_rates = []
    for _ in range(RUNS):
        gc.collect()
        started = time.perf_counter()
        lookups = dict_prefix_lookups(table, full_chains)
        limit_rates.append(lookups / (time.perf_counter() - started))
    del table
    limit = statistics.median(limit_rates)
    print(
        f"machine limit, bare dict prefix lookups (same run): {limit / 1e6:.2f} M lookups/s "
        f"(min {min(limit_rates) / 1e6:.2f}, max {max(limit_rates) / 1e6:.2f}); "
        f"one 64-block prefix match = {CHAIN / limit * 1e6:.1f} µs"
    )
    mean_depth = statistics.mean(len(p) for p in probes)
    print(f"request key chains: mean {mean_depth:.1f} blocks\n")

    header = f"{'instances':>9}  {'policy':<13} {'p50 µs':>8} {'p99 µs':>8}   "
    header += f"{'decide p50':>10} {'decide p99':>10}   accepted"
    for count in args.instances:
        instances = make_instances(count, rng)
        built = time.perf_counter()
        index = build_index(chains, [i.id for i in instances], rng)
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
        print(
            f"{count} instances: index of {index.num_blocks:,} blocks, "
            f"{len(index.sources())} holders, built in {time.perf_counter() - built:.1f} s"
        )
        print(header)
        us = percentile_us
        for name in POLICY_NAMES:
            total, decide, accepted = time_decisions(name, index, instances, requests)
            print(
                f"{count:>9}  {name:<13} {us(total, 50):8.1f} {us(total, 99):8.1f}"
                f"   {us(decide, 50):10.1f} {us(decide, 99):10.1f}"
                f"   {accepted / len(total):7.1%}"
            )
        del index
        gc.unfreeze()
        print()
    print("goal: p99 <= 500 µs at 64 instances")
    return 0


if __name__ == "__main__":
    sys.exit(main())
