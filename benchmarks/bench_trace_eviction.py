"""Eviction policies on the Mooncake conversation trace, beside Belady's optimum.

Replays the prompt-block stream of ``conversation_trace.jsonl`` (each request's ``hash_ids`` in
order; 512-token blocks): a block is a *hit* if it is cached when accessed, and is inserted after
a miss (evicting as the store node does: ``select_victim`` then ``on_remove`` until there is
room). Caches hold 1 %, 5 % and 20 % of the trace's distinct blocks. For each capacity it prints,
per policy (every ``kvstore.policy.factory.PolicyKind``):

* **block hit ratio**: hits / accesses;
* **prefix hit ratio**: the leading hits of each request (blocks 0..i-1 all hit) / accesses. A
  block is a chain link, and a prefix-caching engine can only use a hit whose predecessors all
  hit, so this is the ratio that saves prefill;
* each as a fraction of **Belady's** (offline MIN: on a miss with a full cache, drop whichever of
  the cached blocks and the new one is next used farthest in the future -- the new one is then
  not inserted; computed with precomputed next-use positions and a lazy max-heap);
* the **infinite-cache** bound (every re-access hits; the trace's README says 36.6 %);
* ``LRU+oracle adm.``: LRU that caches a block only if it will be accessed again -- the offline
  bound of any admission filter in front of LRU (what is left to Belady is eviction order).

The admission policies (``W_TINYLFU``, ``SECOND_HIT_LRU``: kvstore.policy.admitted.AdmittedPolicy)
see the same events as the others: a hit is ``on_access``, a miss ``on_insert`` after the evictions,
and their admission decision is taken inside ``select_victim`` (a refused block is the next victim).

One extra row, ``LRU, tail first``, touches each request's blocks from last to first after the
request (as vLLM frees a finished request's blocks, tail first), so an LRU cache evicts chain
tails before the heads that make them reachable.

    .venv/bin/python benchmarks/bench_trace_eviction.py [--trace PATH]
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kvstore.policy.base import EvictionPolicy  # noqa: E402
from kvstore.policy.factory import PolicyKind, make_policy  # noqa: E402
from kvstore.policy.lru import LRUPolicy  # noqa: E402

DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "traces" / "conversation_trace.jsonl"
FRACTIONS = (0.01, 0.05, 0.20)


@dataclass(frozen=True, slots=True)
class Outcome:
    hits: int
    prefix_hits: int
    seconds: float


def load_requests(path: Path) -> list[list[int]]:
    with path.open() as f:
        return [json.loads(line)["hash_ids"] for line in f if line.strip()]


def replay(
    policy: EvictionPolicy, capacity: int, requests: Sequence[Sequence[bytes]], tail_first: bool
) -> Outcome:
    started = time.perf_counter()
    cached: set[bytes] = set()
    hits = prefix_hits = 0

    def anything(key: bytes) -> bool:
        return True

    for request in requests:
        leading = True
        for key in request:
            if key in cached:
                policy.on_access(key)
                hits += 1
                prefix_hits += leading
                continue
            leading = False
            while len(cached) >= capacity:
                victim = policy.select_victim(anything)
                assert victim is not None
                policy.on_remove(victim)
                cached.remove(victim)
            policy.on_insert(key)
            cached.add(key)
        if tail_first:
            for key in reversed(request):
                policy.on_access(key)
    return Outcome(hits, prefix_hits, time.perf_counter() - started)


def next_uses(stream: Sequence[int]) -> list[int]:
    """``result[i]``: the position of the next access to ``stream[i]``'s block (len: never)."""
    never = len(stream)
    result = [never] * len(stream)
    last: dict[int, int] = {}
    for position in range(len(stream) - 1, -1, -1):
        block = stream[position]
        result[position] = last.get(block, never)
        last[block] = position
    return result


def offline_replay(
    requests: Sequence[Sequence[int]],
    next_use: Sequence[int],
    on_hit: Callable[[int, int], None],
    on_miss: Callable[[int, int], None],
    cached: Container[int],
) -> Outcome:
    """Replay with knowledge of the future: ``on_hit`` / ``on_miss(block, its next use)``."""
    started = time.perf_counter()
    hits = prefix_hits = 0
    position = 0
    for request in requests:
        leading = True
        for block in request:
            upcoming = next_use[position]
            position += 1
            if block in cached:
                hits += 1
                prefix_hits += leading
                on_hit(block, upcoming)
            else:
                leading = False
                on_miss(block, upcoming)
    return Outcome(hits, prefix_hits, time.perf_counter() - started)


def belady(capacity: int, requests: Sequence[Sequence[int]], next_use: Sequence[int]) -> Outcome:
    """Offline MIN: evict (or do not insert) whatever is next used farthest in the future."""
    never = len(next_use)
    cached: dict[int, int] = {}  # block -> position of its next use
    farthest: list[tuple[int, int]] = []  # max-heap of (-next use, block); stale entries skipped

    def on_hit(block: int, upcoming: int) -> None:
        cached[block] = upcoming
        heapq.heappush(farthest, (-upcoming, block))

    def on_miss(block: int, upcoming: int) -> None:
        if upcoming == never:
            return  # never used again: caching it cannot help
        if len(cached) >= capacity:
            while cached.get(farthest[0][1]) != -farthest[0][0]:
                heapq.heappop(farthest)  # stale: that block was used (or evicted) since
            if -farthest[0][0] <= upcoming:
                return  # everything cached is needed sooner than this block
            del cached[heapq.heappop(farthest)[1]]
        on_hit(block, upcoming)

    return offline_replay(requests, next_use, on_hit, on_miss, cached)


def oracle_admission_lru(
    capacity: int, requests: Sequence[Sequence[int]], next_use: Sequence[int]
) -> Outcome:
    """LRU that caches a missed block only if it will be accessed again (an offline bound).

    What a perfect admission filter could give in front of LRU's order: the gap between this
    row and Belady is eviction order, the gap between an online policy and this row admission.
    """
    never = len(next_use)
    cached: OrderedDict[int, None] = OrderedDict()

    def on_hit(block: int, upcoming: int) -> None:
        cached.move_to_end(block)

    def on_miss(block: int, upcoming: int) -> None:
        if upcoming == never:
            return
        if len(cached) >= capacity:
            cached.popitem(last=False)
        cached[block] = None

    return offline_replay(requests, next_use, on_hit, on_miss, cached)


def infinite(requests: Sequence[Sequence[int]]) -> Outcome:
    started = time.perf_counter()
    seen: set[int] = set()
    hits = prefix_hits = 0
    for request in requests:
        leading = True
        for block in request:
            if block in seen:
                hits += 1
                prefix_hits += leading
            else:
                leading = False
                seen.add(block)
    return Outcome(hits, prefix_hits, time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="conversation trace")
    args = parser.parse_args()
    requests = load_requests(args.trace)
    stream = [block for request in requests for block in request]
    distinct = len(set(stream))
    accesses = len(stream)
    as_keys = {block: block.to_bytes(16, "big") for block in set(stream)}  # 16-byte block keys
    key_requests = [[as_keys[block] for block in request] for request in requests]
    next_use = next_uses(stream)

    print(
        f"trace: {args.trace.name}: {len(requests):,} requests, {accesses:,} block accesses, "
        f"{distinct:,} distinct blocks (512 tokens each)"
    )
    bound = infinite(requests)
    print(
        f"infinite cache: block hit ratio {bound.hits / accesses:.1%}, "
        f"prefix hit ratio {bound.prefix_hits / accesses:.1%}\n"
    )
    runs: list[tuple[str, Callable[[], EvictionPolicy], bool]] = [
        (kind.name, lambda kind=kind: make_policy(kind), False) for kind in PolicyKind
    ]
    runs.append(("LRU, tail first", LRUPolicy, True))
    header = (
        f"{'capacity':>17}  {'policy':16} {'block hits':>10} {'of Belady':>9}"
        f" {'prefix hits':>11} {'of Belady':>9} {'time':>6}"
    )
    print(header)
    print("-" * len(header))
    for fraction in FRACTIONS:
        capacity = max(1, round(fraction * distinct))
        label = f"{fraction:.0%} = {capacity:,}"
        best = belady(capacity, requests, next_use)
        rows = [
            ("Belady (MIN)", best),
            ("LRU+oracle adm.", oracle_admission_lru(capacity, requests, next_use)),
        ]
        for name, build, tail_first in runs:
            rows.append((name, replay(build(), capacity, key_requests, tail_first)))
        for name, outcome in rows:
            print(
                f"{label:>17}  {name:16} {outcome.hits / accesses:10.1%}"
                f" {outcome.hits / best.hits:9.1%} {outcome.prefix_hits / accesses:11.1%}"
                f" {outcome.prefix_hits / best.prefix_hits:9.1%} {outcome.seconds:5.1f}s"
            )
            label = ""
        print()
    print(
        f"{'infinite':>17}  {'(bound)':16} {bound.hits / accesses:10.1%} {'':9}"
        f" {bound.prefix_hits / accesses:11.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
