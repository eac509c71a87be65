"""Exact tests of the cluster-wide prefix index (kvstore.cluster.index).

Tables of event sequences with the exact match each must produce, sequence-number rules (gaps,
duplicates, restarts), resync, source removal, slot reuse, many holders, worst-case hash
collisions, and a seeded differential test against a plain-Python model of the same semantics.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest

from kvstore.blocks.tier import Tier
from kvstore.cluster.events import (
    BlocksRemoved,
    BlocksStored,
    KVEvent,
    SourceCleared,
    SourceSnapshot,
)
from kvstore.cluster.index import PrefixIndex
from kvstore.cluster.match import ApplyResult, HolderMatch

HBM, DRAM, SSD = Tier.HBM, Tier.DRAM, Tier.SSD


def key(i: int) -> bytes:
    return (0xC0FFEE_0000 + i).to_bytes(16, "big")


def keys(*ids: int) -> tuple[bytes, ...]:
    return tuple(key(i) for i in ids)


class Feed:
    """Numbers events per source, as a real source would."""

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index
        self.seq: dict[str, int] = {}

    def _next(self, source: str) -> int:
        seq = self.seq.get(source, 0)
        self.seq[source] = seq + 1
        return seq

    def store(self, source: str, tier: Tier, *ids: int) -> ApplyResult:
        return self.index.apply(BlocksStored(source, self._next(source), tier, keys(*ids)))

    def remove(self, source: str, tier: Tier, *ids: int) -> ApplyResult:
        return self.index.apply(BlocksRemoved(source, self._next(source), tier, keys(*ids)))

    def clear(self, source: str) -> ApplyResult:
        return self.index.apply(SourceCleared(source, self._next(source)))


Op = tuple[str, str, Tier | None, tuple[int, ...]]  # (op, source, tier, key ids)
Holder = tuple[str, int, tuple[int, int, int]]


def run(ops: Sequence[Op]) -> PrefixIndex:
    index = PrefixIndex(initial_capacity=4)
    feed = Feed(index)
    for op, source, tier, ids in ops:
        if op == "store":
            assert tier is not None
            assert feed.store(source, tier, *ids) is ApplyResult.APPLIED
        elif op == "remove":
            assert tier is not None
            assert feed.remove(source, tier, *ids) is ApplyResult.APPLIED
        elif op == "clear":
            assert feed.clear(source) is ApplyResult.APPLIED
        else:
            assert op == "drop"
            assert index.remove_source(source)
    index.audit()
    return index


WORKED_EXAMPLE: list[Op] = [
    ("store", "a", DRAM, (0, 1, 2)),
    ("store", "a", SSD, (2,)),
    ("store", "b", SSD, (0, 1)),
    ("store", "e", HBM, (0,)),
    ("store", "d", DRAM, (4,)),
]

MATCH_CASES: list[tuple[str, list[Op], tuple[int, ...], int, tuple[int, ...], list[Holder]]] = [
    # name, events, query, depth, depth_by_tier, holders (holder, depth, num_blocks_by_tier)
    (
        "worked example (docs §10.3)",
        WORKED_EXAMPLE,
        (0, 1, 2, 3, 4),
        3,
        (1, 3, 3),
        [("a", 3, (0, 3, 0)), ("b", 2, (0, 0, 2)), ("e", 1, (1, 0, 0))],
    ),
    (
        "worked example, second query",
        WORKED_EXAMPLE,
        (1,),
        1,
        (0, 1, 1),
        [("a", 1, (0, 1, 0)), ("b", 1, (0, 0, 1))],
    ),
    ("empty index", [], (0, 1), 0, (0, 0, 0), []),
    ("empty query", WORKED_EXAMPLE, (), 0, (0, 0, 0), []),
    (
        "a chain's tail without its head is no prefix",
        [("store", "a", DRAM, (1, 2))],
        (0, 1, 2),
        0,
        (0, 0, 0),
        [],
    ),
    (
        "removing a middle block ends the prefix",
        [("store", "a", DRAM, (0, 1, 2, 3)), ("remove", "a", DRAM, (1,))],
        (0, 1, 2, 3),
        1,
        (0, 1, 1),
        [("a", 1, (0, 1, 0))],
    ),
    (
        "a block demoted DRAM -> SSD",
        [
            ("store", "a", DRAM, (0, 1)),
            ("store", "a", SSD, (0, 1)),
            ("remove", "a", DRAM, (0, 1)),
        ],
        (0, 1),
        2,
        (0, 0, 2),
        [("a", 2, (0, 0, 2))],
    ),
    (
        "the union reaches deeper than any one holder",
        [("store", "a", DRAM, (0, 1)), ("store", "b", SSD, (2, 3))],
        (0, 1, 2, 3, 4),
        4,
        (0, 2, 4),
        [("a", 2, (0, 2, 0))],
    ),
    (
        "engine HBM prefix plus a node's longer DRAM copy",
        [("store", "n1", DRAM, (0, 1, 2, 3)), ("store", "e1", HBM, (0, 1))],
        (0, 1, 2, 3),
        4,
        (2, 4, 4),
        [("n1", 4, (0, 4, 0)), ("e1", 2, (2, 0, 0))],
    ),
    (
        "fastest copy per block of one holder",
        [
            ("store", "a", SSD, (0, 1, 2, 3)),
            ("store", "a", DRAM, (1, 3)),
            ("store", "a", HBM, (3,)),
        ],
        (0, 1, 2, 3),
        4,
        (0, 0, 4),
        [("a", 4, (1, 1, 2))],
    ),
    (
        "equal depths sort by holder id",
        [("store", "z", DRAM, (0,)), ("store", "m", DRAM, (0,)), ("store", "b", SSD, (0,))],
        (0, 9),
        1,
        (0, 1, 1),
        [("b", 1, (0, 0, 1)), ("m", 1, (0, 1, 0)), ("z", 1, (0, 1, 0))],
    ),
    (
        "a cleared source holds nothing",
        [("store", "a", DRAM, (0, 1)), ("store", "b", SSD, (0,)), ("clear", "a", None, ())],
        (0, 1),
        1,
        (0, 0, 1),
        [("b", 1, (0, 0, 1))],
    ),
    (
        "a removed source vanishes",
        [("store", "a", DRAM, (0, 1)), ("store", "b", SSD, (0,)), ("drop", "a", None, ())],
        (0, 1),
        1,
        (0, 0, 1),
        [("b", 1, (0, 0, 1))],
    ),
    (
        "storing twice and removing a block never stored are no-ops",
        [
            ("store", "a", DRAM, (0, 1, 1, 0)),
            ("store", "a", DRAM, (0,)),
            ("remove", "a", DRAM, (7,)),
            ("remove", "a", SSD, (0,)),
        ],
        (0, 1),
        2,
        (0, 2, 2),
        [("a", 2, (0, 2, 0))],
    ),
]


@pytest.mark.parametrize(
    ("events", "query", "depth", "depth_by_tier", "holders"),
    [case[1:] for case in MATCH_CASES],
    ids=[case[0] for case in MATCH_CASES],
)
def test_match(
    events: list[Op],
    query: tuple[int, ...],
    depth: int,
    depth_by_tier: tuple[int, ...],
    holders: list[Holder],
) -> None:
    match = run(events).match(keys(*query))
    assert match.depth == depth
    assert match.depth_by_tier == depth_by_tier
    assert match.holders == tuple(HolderMatch(h, d, t) for h, d, t in holders)


def test_holders_at_and_holder_lookup() -> None:
    match = run(WORKED_EXAMPLE).match(keys(0, 1, 2, 3, 4))
    assert match.holders_at(0) == (("e", HBM), ("a", DRAM), ("b", SSD))
    assert match.holders_at(1) == (("a", DRAM), ("b", SSD))
    assert match.holders_at(2) == (("a", DRAM), ("a", SSD))
    for outside in (3, 4, -1):
        with pytest.raises(IndexError):
            match.holders_at(outside)
    assert match.holder("b") == HolderMatch("b", 2, (0, 0, 2))
    assert match.holder("d") is None  # holds k4, but not the first block


def test_a_match_is_a_snapshot() -> None:
    index = run(WORKED_EXAMPLE)
    match = index.match(keys(0, 1, 2))
    index.remove_source("a")
    index.apply(BlocksStored("e", 1, HBM, keys(1, 2)))
    assert match.depth == 3
    assert match.holders[0] == HolderMatch("a", 3, (0, 3, 0))
    assert match.holders_at(2) == (("a", DRAM), ("a", SSD))
    after = index.match(keys(0, 1, 2))
    assert after.holders == (HolderMatch("e", 3, (3, 0, 0)), HolderMatch("b", 2, (0, 0, 2)))


def test_match_refuses_malformed_keys() -> None:
    index = run(WORKED_EXAMPLE)
    with pytest.raises(ValueError):
        index.match([key(0), b"short"])
    with pytest.raises(ValueError):
        index.match([key(0)[:15], key(1) + b"x"])  # right total length, wrong keys


# -- sequence numbers ---------------------------------------------------------------------------

A = "node-a"
GAP_STEPS: list[tuple[KVEvent, ApplyResult, bool, int, bool]] = [
    # event, result, key(event's first key) present afterwards?, next_seq(A), needs_resync(A)
    (BlocksStored(A, 0, DRAM, keys(1)), ApplyResult.APPLIED, True, 1, False),
    (BlocksStored(A, 1, DRAM, keys(2)), ApplyResult.APPLIED, True, 2, False),
    (BlocksRemoved(A, 1, DRAM, keys(2)), ApplyResult.DUPLICATE, True, 2, False),
    (BlocksRemoved(A, 0, DRAM, keys(1)), ApplyResult.DUPLICATE, True, 2, False),
    (BlocksStored(A, 4, DRAM, keys(3)), ApplyResult.GAP, True, 5, True),  # applied anyway
    (BlocksStored(A, 3, DRAM, keys(4)), ApplyResult.DUPLICATE, False, 5, True),  # late: dropped
    (BlocksRemoved(A, 5, DRAM, keys(1)), ApplyResult.APPLIED, False, 6, True),  # still owed
    (SourceCleared(A, 9), ApplyResult.APPLIED, False, 10, False),  # subsumes the gap
    (BlocksStored(A, 10, SSD, keys(5)), ApplyResult.APPLIED, True, 11, False),
    (SourceCleared(A, 4), ApplyResult.DUPLICATE, True, 11, False),  # stale clear
    (SourceCleared(A, 0), ApplyResult.APPLIED, False, 1, False),  # restart: new incarnation
    (BlocksStored(A, 1, SSD, keys(6)), ApplyResult.APPLIED, True, 2, False),
]


def test_sequence_numbers_step_by_step() -> None:
    index = PrefixIndex()
    for step, (event, result, present, next_seq, resync) in enumerate(GAP_STEPS):
        assert index.apply(event) is result, step
        probe = event.keys[0] if not isinstance(event, SourceCleared) else key(5)
        assert (index.match([probe]).depth == 1) is present, step
        assert index.next_seq(A) == next_seq, step
        assert index.needs_resync(A) is resync, step
        index.audit()
    assert index.num_blocks == 1  # key 6 only: the restart wiped key 5


def test_unknown_sources_are_not_resurrected() -> None:
    index = PrefixIndex()
    assert index.apply(BlocksStored("late", 3, DRAM, keys(1))) is ApplyResult.GAP
    assert index.num_blocks == 0 and index.sources() == ()
    assert not index.needs_resync("late") and index.next_seq("late") == 0
    # a crashed node's straggler after remove_source is refused the same way
    assert index.apply(BlocksStored("b", 0, DRAM, keys(1))) is ApplyResult.APPLIED
    assert index.remove_source("b")
    assert not index.remove_source("b")
    assert index.apply(BlocksStored("b", 1, DRAM, keys(2))) is ApplyResult.GAP
    assert index.num_blocks == 0
    # a new incarnation is welcome
    assert index.apply(SourceCleared("b", 0)) is ApplyResult.APPLIED
    assert index.apply(BlocksStored("b", 1, DRAM, keys(2))) is ApplyResult.APPLIED
    assert index.match(keys(2)).depth == 1
    # a clear from an unknown source at any seq introduces it: it holds nothing, so no gap
    assert index.apply(SourceCleared("fresh", 5)) is ApplyResult.APPLIED
    assert index.next_seq("fresh") == 6 and not index.needs_resync("fresh")
    index.audit()


def test_resync_replaces_what_a_source_holds() -> None:
    index = run(
        [
            ("store", "a", DRAM, (0, 1, 2)),
            ("store", "a", SSD, (9,)),
            ("store", "b", DRAM, (0,)),
        ]
    )
    assert index.apply(BlocksStored("a", 7, DRAM, keys(3))) is ApplyResult.GAP
    assert index.needs_resync("a")
    index.resync(SourceSnapshot("a", 20, {DRAM: keys(0), SSD: keys(1, 2)}))
    assert not index.needs_resync("a") and index.next_seq("a") == 21
    match = index.match(keys(0, 1, 2, 3))
    assert (match.depth, match.depth_by_tier) == (3, (0, 1, 3))
    assert match.holders == (HolderMatch("a", 3, (0, 1, 2)), HolderMatch("b", 1, (0, 1, 0)))
    assert index.match(keys(9)).depth == 0 and index.match(keys(3)).depth == 0
    assert index.num_blocks == 3
    assert index.apply(BlocksStored("a", 20, SSD, keys(9))) is ApplyResult.DUPLICATE
    assert index.apply(BlocksStored("a", 21, SSD, keys(9))) is ApplyResult.APPLIED
    # a resync of an unknown source brings it in
    index.resync(SourceSnapshot("c", 4, {HBM: keys(0, 1)}))
    assert index.next_seq("c") == 5
    assert index.match(keys(0, 1)).holder("c") == HolderMatch("c", 2, (2, 0, 0))
    assert index.sources() == ("a", "b", "c")
    index.audit()


# -- representation -----------------------------------------------------------------------------


def test_slots_and_table_cells_are_reused() -> None:
    index = PrefixIndex(initial_capacity=8)
    feed = Feed(index)
    feed.store("a", DRAM, *range(1000))
    feed.remove("a", DRAM, *range(1000))
    feed.store("a", DRAM, *range(1000))
    index.audit()
    grown = index.stats()  # the free stack has held 1000 slots once
    for cycle in range(1, 21):
        feed.remove("a", DRAM, *range((cycle - 1) * 1000, cycle * 1000))
        feed.store("a", DRAM, *range(cycle * 1000, (cycle + 1) * 1000))
        assert index.num_blocks == 1000
    index.audit()
    stats = index.stats()
    assert stats.slot_capacity == grown.slot_capacity
    assert stats.table_capacity == grown.table_capacity  # tombstones purged, never grown
    assert index.memory_bytes() == grown.memory_bytes
    assert index.match(keys(*range(20_000, 20_010))).depth_by_tier == (0, 10, 10)


def test_memory_per_block_is_compact() -> None:
    index = PrefixIndex()
    Feed(index).store("a", DRAM, *range(100_000))
    # 16 B key + 3 B masks (<= 8 holders) per slot, 8-16 B of table per block
    assert index.memory_bytes() / index.num_blocks < 50


def test_many_holders_widen_the_masks() -> None:
    index = PrefixIndex()
    feed = Feed(index)
    names = [f"h{i:03d}" for i in range(70)]
    for i, name in enumerate(names):
        feed.store(name, Tier(i % 3), 0)
        if i % 2 == 0:
            feed.store(name, SSD, 1)
    assert index.stats().num_holder_bits == 128
    match = index.match(keys(0, 1))
    assert match.depth == 2 and match.depth_by_tier == (1, 1, 2)  # k1 is only on SSD

    def fastest(i: int, depth: int) -> tuple[int, ...]:
        """Holder i holds k0 in tier i % 3 and, if i is even, k1 on SSD."""
        counts = [0, 0, 0]
        counts[i % 3] += 1
        if depth == 2:
            counts[SSD] += 1
        return tuple(counts)

    expected_even = [HolderMatch(n, 2, fastest(i, 2)) for i, n in enumerate(names) if i % 2 == 0]
    expected_odd = [HolderMatch(n, 1, fastest(i, 1)) for i, n in enumerate(names) if i % 2 == 1]
    assert match.holders == tuple(expected_even + expected_odd)
    # a removed holder's id is reused by the next one: the masks do not widen again
    assert index.remove_source("h005")
    feed.store("newcomer", HBM, 0, 1)
    assert index.stats().num_holder_bits == 128
    assert index.match(keys(0, 1)).holder("newcomer") == HolderMatch("newcomer", 2, (2, 0, 0))
    assert index.match(keys(0)).holder("h005") is None
    index.audit()


def test_worst_case_collisions_stay_correct() -> None:
    """Every key hashed to the same home cell: long probe runs, insert conflicts, tombstones."""
    index = PrefixIndex(initial_capacity=8)
    index._multipliers = np.zeros(2, np.uint64)  # white box: one probe run for all keys
    feed = Feed(index)
    feed.store("a", DRAM, *range(300))
    feed.remove("a", DRAM, *range(0, 300, 3))
    feed.store("b", SSD, *range(0, 300, 3))
    index.audit()
    assert index.match(keys(*range(300))).depth_by_tier == (0, 0, 300)
    assert index.match(keys(*range(300))).holders == (HolderMatch("b", 1, (0, 0, 1)),)
    feed.remove("b", SSD, *range(0, 300, 3))
    assert index.match(keys(*range(300))).depth == 0
    assert index.match(keys(*range(1, 300))).depth == 2
    index.audit()


# -- differential test against a plain-Python model -----------------------------------------------


class Model:
    """The semantics of docs/design/kvstore.md §10.3, written the obvious way."""

    def __init__(self) -> None:
        self.held: dict[str, dict[Tier, set[bytes]]] = {}

    def apply(self, op: str, source: str, tier: Tier, ks: Sequence[bytes]) -> None:
        tiers = self.held.setdefault(source, {t: set() for t in Tier})
        if op == "store":
            tiers[tier].update(ks)
        elif op == "remove":
            tiers[tier].difference_update(ks)
        elif op == "clear":
            for held in tiers.values():
                held.clear()
        else:
            del self.held[source]

    def match(self, query: Sequence[bytes]) -> tuple[int, tuple[int, ...], tuple[HolderMatch, ...]]:
        def leading(has: object) -> int:
            n = 0
            while n < len(query) and has(query[n]):  # type: ignore[operator]
                n += 1
            return n

        depth = leading(lambda k: any(k in s for t in self.held.values() for s in t.values()))
        by_tier = tuple(
            leading(
                lambda k, t=t: any(k in h[u] for h in self.held.values() for u in Tier if u <= t)
            )
            for t in Tier
        )
        holders = []
        for name, tiers in self.held.items():
            d = leading(lambda k, tiers=tiers: any(k in s for s in tiers.values()))
            if d:
                fastest = [min(t for t in Tier if k in tiers[t]) for k in query[:d]]
                holders.append(HolderMatch(name, d, tuple(fastest.count(t) for t in Tier)))
        holders.sort(key=lambda m: (-m.depth, m.holder))
        return depth, by_tier, tuple(holders)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_events_match_the_model(seed: int) -> None:
    rng = random.Random(seed)
    index = PrefixIndex(initial_capacity=2)
    feed = Feed(index)
    model = Model()
    chains = [[key(c * 100 + i) for i in range(12)] for c in range(6)]
    sources = ["n0", "n1", "n2", "e0", "e1"]
    for step in range(1500):
        source = rng.choice(sources)
        roll = rng.random()
        chain = rng.choice(chains)
        start = rng.randrange(len(chain))
        ks = chain[start : start + rng.randint(1, 6)]
        tier = rng.choice(list(Tier))
        if roll < 0.55:
            op = "store"
            index.apply(BlocksStored(source, feed._next(source), tier, tuple(ks)))
        elif roll < 0.93:
            op = "remove"
            index.apply(BlocksRemoved(source, feed._next(source), tier, tuple(ks)))
        elif roll < 0.97:
            op = "clear"
            index.apply(SourceCleared(source, feed._next(source)))
        else:
            op = "drop"
            if source not in model.held:
                continue
            index.remove_source(source)
            feed.seq.pop(source)
        model.apply(op, source, tier, ks)
        query = rng.choice(chains)[: rng.randint(1, 12)]
        match = index.match(query)
        assert (match.depth, match.depth_by_tier, match.holders) == model.match(query), step
        if step % 100 == 0:
            index.audit()
    index.audit()
