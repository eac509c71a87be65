"""Exact tier-change notifications (node, SSD tier, tier manager) and the KV events a NodeAgent
publishes from them, for every kind of change: commit, delete, spill, promotion, DRAM eviction,
SSD capacity eviction, TTL expiry, corrupt deletion, write-behind, restart, rejoin after a reap."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kvstore.blocks.format import BLOCK_HEADER_BYTES, encode_header
from kvstore.blocks.tier import Tier
from kvstore.cluster.events import (
    SOURCE_GONE_SEQ,
    BlocksRemoved,
    BlocksStored,
    KVEvent,
    SourceCleared,
    decode_event,
)
from kvstore.cluster.membership import NodeAgent
from kvstore.cluster.view import ClusterView
from kvstore.metadata import START, EmbeddedMetadataStore
from kvstore.node.arena import Arena
from kvstore.node.ssd.tier import SSDTier
from kvstore.node.store import Lease, StoreNode
from kvstore.node.tiers import TierManager
from kvstore.wire.types import PutStatus
from tests.fakes import FakeClock

PAGE = 4096
MIB = 1024 * 1024
DRAM, SSD = Tier.DRAM, Tier.SSD
_T = TypeVar("_T")
Change = tuple[int, Tier, bool, bool]  # key number, tier, held, reported on the loop thread


def key(n: int) -> bytes:
    return n.to_bytes(16, "big")


def keys(*ns: int) -> tuple[bytes, ...]:
    return tuple(key(n) for n in ns)


def block(n: int, nbytes: int = PAGE) -> bytes:
    payload = bytes((n * 13 + i) % 251 for i in range(nbytes - BLOCK_HEADER_BYTES))
    return encode_header(key(n), payload) + payload


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


class Recorder:
    """A tier listener that records (key number, tier, held, on the recording thread)."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.thread = threading.get_ident()
        self._lock = threading.Lock()

    def __call__(self, k: bytes, tier: Tier, held: bool) -> None:
        with self._lock:
            self.changes.append(
                (int.from_bytes(k, "big"), tier, held, threading.get_ident() == self.thread)
            )

    def take(self) -> list[Change]:
        with self._lock:
            changes, self.changes = self.changes, []
        return changes


@pytest.fixture
def node(tmp_path: Path) -> Iterator[StoreNode]:
    """A node whose arena holds exactly eight one-page blocks."""
    arena = Arena(8 * PAGE, PAGE, directory=str(tmp_path), prefault=False)
    ticks = iter(range(1, 1_000_000))
    yield StoreNode(arena, clock=lambda: float(next(ticks)))
    arena.close()


def make_tiers(node: StoreNode, tmp_path: Path, clock: FakeClock, **kwargs: Any) -> TierManager:
    ssd = SSDTier(str(tmp_path / "ssd"), 16 * MIB, ttl_s=100.0, sync="none", clock=clock)
    options: dict[str, Any] = {"high_watermark": 0.5, "low_watermark": 0.25}
    options.update(kwargs)
    return TierManager(node, ssd, **options)


def fill(node: StoreNode, *ns: int) -> None:
    for n in ns:
        assert node.put(key(n), block(n)) is PutStatus.OK


async def read(tiers: TierManager, n: int) -> bytes | None:
    found = tiers.acquire(key(n))
    if found is Tier.SSD:
        found = await tiers.fetch(key(n))
    if not isinstance(found, Lease):
        return None
    try:
        return bytes(found.view)
    finally:
        tiers.node.release(found)


# -- notifications at the point of change ---------------------------------------------------------


def test_dram_commit_delete_eviction_and_nothing_for_revoked_puts(node: StoreNode) -> None:
    rec = Recorder()
    node.set_listener(rec)
    fill(node, 0, 1)
    assert rec.take() == [(0, DRAM, True, True), (1, DRAM, True, True)]
    pending = node.begin_put(key(2), PAGE)
    assert not isinstance(pending, PutStatus)
    node.revoke(pending)  # never visible: nothing to report
    assert node.put(key(0), block(0)) is PutStatus.EXISTS
    assert rec.take() == []
    assert node.delete([key(1), key(9)]) == 1
    assert rec.take() == [(1, DRAM, False, True)]
    fill(node, *range(2, 9))  # the arena holds 8 blocks: 0, 2..8
    rec.take()
    fill(node, 9)  # evicts the LRU block (0) to make room
    assert rec.take() == [(0, DRAM, False, True), (9, DRAM, True, True)]
    node.set_listener(None)
    fill(node, 10)
    assert rec.take() == []


def test_spill_promotion_delete_and_write_behind(node: StoreNode, tmp_path: Path) -> None:
    async def scenario() -> None:
        rec = Recorder()
        tiers = make_tiers(node, tmp_path, FakeClock(1_000_000.0))
        tiers.set_listener(rec)
        fill(node, 0, 1, 2, 3, 4)
        assert rec.take() == [(n, DRAM, True, True) for n in range(5)]
        # spill: on SSD (the writer thread's commit) before out of DRAM (the loop)
        assert await tiers.spill_to_low_watermark() == 3
        assert rec.take() == [
            (0, SSD, True, False),
            (1, SSD, True, False),
            (2, SSD, True, False),
            (0, DRAM, False, True),
            (1, DRAM, False, True),
            (2, DRAM, False, True),
        ]
        # promotion: a GET of an SSD block brings it into DRAM; the SSD copy stays
        assert await read(tiers, 1) == block(1)
        assert rec.take() == [(1, DRAM, True, True)]
        # a clean spill of a block still fresh on SSD: DRAM only
        fill(node, 5, 6)
        rec.take()
        assert await tiers.spill_to_low_watermark() == 3  # 3 and 4 written, 1 dropped clean
        assert sorted(rec.take()) == [
            (1, DRAM, False, True),
            (3, DRAM, False, True),
            (3, SSD, True, False),
            (4, DRAM, False, True),
            (4, SSD, True, False),
        ]
        # delete: both tiers, at once (the file purge follows on the writer thread)
        assert tiers.delete([key(5), key(0), key(8)]) == 2
        assert rec.take() == [(5, DRAM, False, True), (0, SSD, False, True)]
        await tiers.close()

    run(scenario())


def test_write_behind_reports_the_ssd_copy(node: StoreNode, tmp_path: Path) -> None:
    async def scenario() -> None:
        rec = Recorder()
        tiers = make_tiers(
            node, tmp_path, FakeClock(1_000_000.0), high_watermark=1.0, write_behind=True
        )
        tiers.set_listener(rec)
        fill(node, 0, 1)
        for n in (0, 1):
            tiers.note_commit(key(n))
        assert await tiers.persist_pending() == 2
        assert rec.take() == [
            (0, DRAM, True, True),
            (1, DRAM, True, True),
            (0, SSD, True, False),
            (1, SSD, True, False),
        ]
        await tiers.close()

    run(scenario())


def test_ssd_capacity_eviction_ttl_sweep_corruption_and_rewrite(tmp_path: Path) -> None:
    clock = FakeClock(1_000_000.0)
    rec = Recorder()
    with SSDTier(str(tmp_path / "ssd"), 16 * MIB, ttl_s=100.0, sync="none", clock=clock) as ssd:
        ssd.set_listener(rec)
        for n in range(11):  # the budget holds exactly 11 blocks of 1 MiB
            assert ssd.put(key(n), block(n, MIB))
        assert rec.take() == [(n, SSD, True, True) for n in range(11)]
        assert ssd.put(key(11), block(11, MIB))  # capacity: evicts the LRU block, 0
        assert rec.take() == [(0, SSD, False, True), (11, SSD, True, True)]
        clock.now += 60.0
        assert ssd.put(key(5), block(5, MIB))  # a rewrite (TTL refresh): still on SSD
        assert ssd.put(key(20), block(20, MIB))  # evicts 1, the LRU block, to make room
        assert rec.take() == [(1, SSD, False, True), (20, SSD, True, True)]
        clock.now += 41.0  # the blocks written 101 s ago expire; 5 and 20 are younger
        assert ssd.sweep_expired() == 9
        assert rec.take() == [(n, SSD, False, True) for n in (2, 3, 4, 6, 7, 8, 9, 10, 11)]
        bad = bytearray(block(30, 2 * PAGE))
        bad[PAGE] ^= 0x01
        assert ssd.put(key(30), bytes(bad))
        assert rec.take() == [(30, SSD, True, True)]
        assert ssd.get(key(30)) is None  # fails its checksum: dropped
        assert rec.take() == [(30, SSD, False, True)]
        assert ssd.delete([key(20), key(99)]) == 1
        assert rec.take() == [(20, SSD, False, True)]


# -- the events a NodeAgent publishes ------------------------------------------------------------


def published(store: EmbeddedMetadataStore, cursor: str) -> tuple[str, list[KVEvent]]:
    cursor, messages = store.read(cursor, 0.0, 100_000)
    return cursor, [decode_event(m) for m in messages]


def make_agent(store: EmbeddedMetadataStore, tiers: TierManager) -> NodeAgent:
    # Nothing runs by itself: no timer flush, reconcile or heartbeat within the test.
    return NodeAgent(
        store,
        "n1",
        {"endpoint": "127.0.0.1:1"},
        tiers,
        heartbeat_interval_s=3600.0,
        heartbeat_timeout_s=7200.0,
        flush_interval_s=3600.0,
        reconcile_interval_s=3600.0,
    )


def test_agent_publishes_each_kind_of_change_exactly(node: StoreNode, tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock(1_000_000.0)
        store = EmbeddedMetadataStore()
        tiers = make_tiers(node, tmp_path, clock)
        agent = make_agent(store, tiers)
        await agent.start()
        await agent.drain()
        cursor, events = published(store, START)
        assert events == [SourceCleared("n1", 0)]

        fill(node, 0, 1, 2, 3, 4)  # commits
        await agent.drain()
        cursor, events = published(store, cursor)
        assert events == [BlocksStored("n1", 1, DRAM, keys(0, 1, 2, 3, 4))]

        await tiers.spill_to_low_watermark()  # 0, 1, 2 -> SSD: additions before removals
        await agent.drain()
        cursor, events = published(store, cursor)
        assert events == [
            BlocksStored("n1", 2, SSD, keys(0, 1, 2)),
            BlocksRemoved("n1", 3, DRAM, keys(0, 1, 2)),
        ]

        assert await read(tiers, 1) == block(1)  # promotion
        await agent.drain()
        cursor, events = published(store, cursor)
        assert events == [BlocksStored("n1", 4, DRAM, keys(1))]

        fill(node, 5)
        assert tiers.delete([key(5)]) == 1  # in and out within one flush: nothing to say
        assert tiers.delete([key(1)]) == 1  # both tiers
        await agent.drain()
        cursor, events = published(store, cursor)
        assert events == [
            BlocksRemoved("n1", 5, DRAM, keys(1)),
            BlocksRemoved("n1", 6, SSD, keys(1)),
        ]

        fill(node, 6, 7, 8, 9, 10, 11, 12)  # the arena holds 8 blocks: 12 evicts 3 (LRU)
        await agent.drain()
        cursor, events = published(store, cursor)
        assert events == [
            BlocksStored("n1", 7, DRAM, keys(6, 7, 8, 9, 10, 11, 12)),
            BlocksRemoved("n1", 8, DRAM, keys(3)),
        ]
        fill(node, 13)
        await agent.drain()
        cursor, events = published(store, cursor)
        assert events == [
            BlocksStored("n1", 9, DRAM, keys(13)),
            BlocksRemoved("n1", 10, DRAM, keys(4)),
        ]

        clock.now += 101.0  # TTL: 0 and 2 expire; reported when the sweep removes them
        assert await tiers.sweep() == 2
        await agent.drain()
        cursor, events = published(store, cursor)
        assert events == [BlocksRemoved("n1", 11, SSD, keys(0, 2))]

        assert tiers.ssd is not None
        bad = bytearray(block(40))
        bad[PAGE // 2] ^= 0x01
        await asyncio.get_running_loop().run_in_executor(None, tiers.ssd.put, key(40), bytes(bad))
        await agent.drain()
        cursor, events = published(store, cursor)
        assert events == [BlocksStored("n1", 12, SSD, keys(40))]
        # Reading it reserves arena space (evicting 6, the LRU block), then fails the checksum
        # on a reader thread: the block is dropped from the SSD.
        assert await read(tiers, 40) is None
        await agent.drain()
        cursor, events = published(store, cursor)
        assert events == [
            BlocksRemoved("n1", 13, DRAM, keys(6)),
            BlocksRemoved("n1", 14, SSD, keys(40)),
        ]

        await agent.stop()
        cursor, events = published(store, cursor)
        assert events == [SourceCleared("n1", SOURCE_GONE_SEQ)]
        assert store.members() == {}
        await tiers.close()

    run(scenario())


def test_write_behind_events_and_restart_reannounces_ssd_blocks(
    node: StoreNode, tmp_path: Path
) -> None:
    async def scenario() -> None:
        store = EmbeddedMetadataStore()
        tiers = make_tiers(
            node, tmp_path, FakeClock(1_000_000.0), high_watermark=1.0, write_behind=True
        )
        agent = make_agent(store, tiers)
        await agent.start()
        fill(node, 0, 1)
        for n in (0, 1):
            tiers.note_commit(key(n))
        await tiers.persist_pending()
        await agent.drain()
        _, events = published(store, START)
        assert events == [
            SourceCleared("n1", 0),
            BlocksStored("n1", 1, DRAM, keys(0, 1)),
            BlocksStored("n1", 2, SSD, keys(0, 1)),  # the write-behind batch, off the loop
        ]
        await agent.stop()
        await tiers.close()

    run(scenario())

    # A new node on the same SSD directory: SourceCleared(0), then its recovered SSD blocks.
    async def restarted() -> None:
        arena = Arena(8 * PAGE, PAGE, directory=str(tmp_path), prefault=False)
        try:
            store = EmbeddedMetadataStore()
            tiers = make_tiers(StoreNode(arena), tmp_path, FakeClock(1_000_000.0))
            agent = make_agent(store, tiers)
            await agent.start()
            await agent.drain()
            assert published(store, START)[1] == [
                SourceCleared("n1", 0),
                BlocksStored("n1", 1, SSD, keys(0, 1)),
            ]
            await agent.stop()
            await tiers.close()
        finally:
            arena.close()

    run(restarted())


def test_reaped_while_alive_rejoins_as_a_new_incarnation(node: StoreNode) -> None:
    async def scenario() -> None:
        clock = FakeClock(1_000_000.0)
        store = EmbeddedMetadataStore(clock=clock, max_age_s=86400.0)  # keeps all 2 h
        tiers = TierManager(node)
        agent = make_agent(store, tiers)
        await agent.start()
        fill(node, 0)
        await agent.drain()
        clock.now += 7201.0  # the heartbeat stalled past its timeout
        view = ClusterView(store, clock=clock)
        view.refresh_membership()  # a sweep reaps n1
        assert (view.num_reaped, store.members()) == (1, {})
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, agent.beat)  # n1's next heartbeat notices
        for _ in range(500):  # the rejoin runs on the loop, handed over by call_soon_threadsafe
            if agent.num_rejoins:
                break
            await asyncio.sleep(0.01)
        assert agent.num_rejoins == 1
        await agent.drain()
        _, events = published(store, START)
        assert events == [
            SourceCleared("n1", 0),
            BlocksStored("n1", 1, DRAM, keys(0)),
            SourceCleared("n1", SOURCE_GONE_SEQ),  # the sweeper's
            SourceCleared("n1", 0),  # the new incarnation's
            BlocksStored("n1", 1, DRAM, keys(0)),
        ]
        assert set(store.members()) == {"n1"}
        view.poll_once(0.0)
        view.refresh_membership()
        assert view.holders(key(0)) == [("n1", DRAM)]
        await agent.stop()

    run(scenario())
