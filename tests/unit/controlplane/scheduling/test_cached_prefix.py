"""The cached prefix of a request from the prefix index (pool, SSD, each engine's HBM), and
prefix_aware routing on it.

Latency models and units: scheduling_helpers.py (this folder; prefill 1 ms per new
token, decode step 10 ms + 1 ms per sequence, TCP 100 MB/s, shm 1 GB/s, 1000 B of KV per token).
The default request: 1000 prompt tokens (62 blocks of 16 can hit), 101 output tokens.
"""

from __future__ import annotations

from types import MappingProxyType

from controlplane.scheduling import (
    NO_CACHE,
    Assign,
    CachedPrefix,
    RequestSnapshot,
    cached_prefix,
)
from controlplane.scheduling.policies import (
    PrefixAwarePolicy,
)
from kvstore.blocks.tier import Tier
from kvstore.cluster.events import BlocksStored
from kvstore.cluster.index import PrefixIndex
from tests.unit.controlplane.scheduling.scheduling_helpers import (
    BLOCK,
    D,
    P,
    config,
    instance,
)

# -- cached prefix from the prefix index -----------------------------------------------------

CHAIN = tuple(bytes([i]) * 16 for i in range(1, 31))


def index_with(*stored: tuple[str, Tier, slice]) -> PrefixIndex:
    index = PrefixIndex()
    seqs: dict[str, int] = {}
    for source, tier, blocks in stored:
        seq = seqs.get(source, 0)
        index.apply(BlocksStored(source, seq, tier, CHAIN[blocks]))
        seqs[source] = seq + 1
    return index


def test_cached_prefix_of_an_empty_match() -> None:
    assert cached_prefix(PrefixIndex().match(CHAIN), {"d0"}) is NO_CACHE


def test_cached_prefix_spread_over_store_nodes_is_exact() -> None:
    index = index_with(
        ("node-a", Tier.DRAM, slice(0, 10)),
        ("node-b", Tier.SSD, slice(10, 20)),
        ("node-b", Tier.DRAM, slice(20, 25)),
    )
    # Blocks 10..19 only on SSD; counted from the first SSD-only block on (an upper bound).
    assert cached_prefix(index.match(CHAIN), {"d0"}) == CachedPrefix(25, 15)


def test_cached_prefix_separates_engine_hbm_from_the_pool() -> None:
    index = index_with(
        ("d0", Tier.HBM, slice(0, 15)),
        ("p0", Tier.HBM, slice(0, 30)),
        ("node-a", Tier.DRAM, slice(0, 8)),
        ("node-a", Tier.SSD, slice(8, 12)),
    )
    prefix = cached_prefix(index.match(CHAIN), {"d0", "p0", "d1"})
    assert prefix == CachedPrefix(12, 4, MappingProxyType({"p0": 30, "d0": 15}))
    only_engines = index_with(("d0", Tier.HBM, slice(0, 5)))
    assert cached_prefix(only_engines.match(CHAIN), {"d0"}) == CachedPrefix(
        0, 0, MappingProxyType({"d0": 5})
    )


def test_prefix_aware_routes_to_the_engine_holding_the_prefix() -> None:
    # 20 blocks of 16 tokens resident in p1's HBM; p0 has nothing cached.
    index = index_with(("p1", Tier.HBM, slice(0, 20)))
    cluster = [instance("p0", P), instance("p1", P, queued=64), instance("d0", D)]
    prefix = cached_prefix(index.match(CHAIN[:20]), {i.id for i in cluster})
    decision = PrefixAwarePolicy(config(local_prefill_threshold_tokens=0)).decide(
        RequestSnapshot(20 * BLOCK + 1, 10, BLOCK, prefix), cluster
    )
    assert isinstance(decision, Assign)
    assert (decision.prefill, decision.decode, decision.cached_blocks) == ("p1", "d0", 20)
