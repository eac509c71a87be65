"""Exact tests of DRAM <-> SSD movement (kvstore.node.tiers) and the node's spill/promotion
hooks."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kvstore.blocks.format import BLOCK_HEADER_BYTES, encode_header
from kvstore.blocks.tier import Tier
from kvstore.node.arena import Arena
from kvstore.node.ssd.tier import SSDTier
from kvstore.node.store import Lease, StoreNode
from kvstore.node.tiers import TierManager
from kvstore.wire.types import PutStatus

PAGE = 4096
_T = TypeVar("_T")


def key(n: int) -> bytes:
    return n.to_bytes(16, "big")


def block(n: int, nbytes: int = PAGE) -> bytes:
    """A valid block of exactly ``nbytes`` (one arena page by default)."""
    payload = bytes((n * 13 + i) % 251 for i in range(nbytes - BLOCK_HEADER_BYTES))
    return encode_header(key(n), payload) + payload


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coro)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[StoreNode]:
    """A node whose arena holds exactly eight one-page blocks."""
    arena = Arena(8 * PAGE, PAGE, directory=str(tmp_path), prefault=False)
    ticks = iter(range(1, 1_000_000))
    yield StoreNode(arena, clock=lambda: float(next(ticks)))
    arena.close()


def make_tiers(node: StoreNode, tmp_path: Path, **kwargs: Any) -> TierManager:
    ssd = SSDTier(str(tmp_path / "ssd"), 16 * 1024 * 1024, sync="none")
    options: dict[str, Any] = {"high_watermark": 0.5, "low_watermark": 0.25}
    options.update(kwargs)
    return TierManager(node, ssd, **options)


def fill(node: StoreNode, *ns: int) -> None:
    for n in ns:
        assert node.put(key(n), block(n)) is PutStatus.OK


def in_dram(node: StoreNode) -> list[int]:
    return [n for n in range(20) if node.contains(key(n))]


def on_ssd(tiers: TierManager) -> list[int]:
    assert tiers.ssd is not None
    return sorted(int.from_bytes(k, "big") for k in tiers.ssd.iter_keys())


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


# -- node hooks ------------------------------------------------------------------------------


def test_finish_spill_drops_only_unchanged_cold_blocks(node: StoreNode) -> None:
    fill(node, 0, 1, 2)
    assert node.coldest_evictable() == key(0)
    pins = [node.pin_for_spill(key(n)) for n in (0, 1, 2)]
    assert node.coldest_evictable() is None  # all pinned
    assert node.get(key(1)) is not None  # read while being spilled: hot again
    node.delete([key(2)])  # deleted while being spilled
    assert [node.finish_spill(p, stored=True) for p in pins] == [True, False, False]
    assert in_dram(node) == [1]
    assert node.stats().arena.used_bytes == PAGE  # 2's page was freed at the release
    fill(node, 3)
    pin = node.pin_for_spill(key(3))
    assert node.finish_spill(pin, stored=False) is False  # the write failed: stays
    assert in_dram(node) == [1, 3]
    stats = node.stats()
    assert (stats.num_leases, stats.evictions, stats.hits) == (0, 0, 1)  # pins are not reads


def test_transient_and_promoted_extents(node: StoreNode) -> None:
    pending = node.begin_transient(key(5), PAGE)
    assert not isinstance(pending, PutStatus)
    pending.view[:] = block(5)
    assert node.stats().num_writing == 1 and not node.contains(key(5))
    lease = node.detach(pending)
    assert bytes(lease.view) == block(5) and not node.contains(key(5))
    node.release(lease)
    assert node.stats().arena.used_bytes == 0
    pending = node.begin_put(key(6), PAGE)
    assert not isinstance(pending, PutStatus)
    pending.view[:] = block(6)
    lease = node.promote(pending)
    node.release(lease)
    stats = node.stats()
    assert (node.contains(key(6)), stats.puts, stats.hits, stats.num_writing) == (True, 0, 0, 0)
    assert node.drop_copy(key(6)) and not node.contains(key(6))
    assert node.stats().arena.used_bytes == 0


# -- tier manager ----------------------------------------------------------------------------


def test_spill_moves_lru_blocks_until_below_the_low_watermark(
    node: StoreNode, tmp_path: Path
) -> None:
    async def scenario() -> None:
        tiers = make_tiers(node, tmp_path)
        fill(node, 0, 1, 2, 3, 4)  # 5/8 of the arena > 0.5
        assert node.get(key(0)) is not None  # LRU order now 1, 2, 3, 4, 0
        assert await tiers.spill_to_low_watermark() == 3  # down to 2/8 = 0.25
        assert (in_dram(node), on_ssd(tiers)) == ([0, 4], [1, 2, 3])
        assert tiers.match_prefix([key(n) for n in (0, 1, 4, 7, 2)]) == [
            Tier.DRAM,
            Tier.SSD,
            Tier.DRAM,
        ]
        assert tiers.exists([key(n) for n in (1, 7, 4)]) == [True, False, True]
        assert tiers.locate(key(2)) is Tier.SSD and tiers.locate(key(7)) is None
        assert tiers.ssd is not None and tiers.ssd.get(key(2)) == block(2)
        stats = tiers.stats()
        assert (stats.spills, stats.spill_bytes, stats.spills_clean) == (3, 3 * PAGE, 0)
        assert (stats.dram_blocks, stats.ssd_blocks, stats.arena_usage) == (2, 3, 0.25)
        assert await tiers.spill_to_low_watermark() == 0  # not above the low watermark
        await tiers.close()

    run(scenario())


def test_get_from_ssd_promotes_inline_and_a_second_spill_is_clean(
    node: StoreNode, tmp_path: Path
) -> None:
    async def scenario() -> None:
        tiers = make_tiers(node, tmp_path)
        fill(node, 0, 1, 2, 3, 4)
        await tiers.spill_to_low_watermark()  # 0, 1, 2 -> SSD
        assert await read(tiers, 1) == block(1)
        assert (in_dram(node), on_ssd(tiers)) == ([1, 3, 4], [0, 1, 2])  # inclusive
        assert tiers.locate(key(1)) is Tier.DRAM
        assert await read(tiers, 1) == block(1)  # now a DRAM hit
        stats = tiers.stats()
        assert (stats.promotions, stats.ssd_hits, stats.dram_hits) == (1, 1, 1)
        fill(node, 5, 6)  # 5/8: LRU order 3, 4, 1, 5, 6
        writes_before = tiers.ssd.stats().writes if tiers.ssd else 0
        assert await tiers.spill_to_low_watermark() == 3
        assert (in_dram(node), on_ssd(tiers)) == ([5, 6], [0, 1, 2, 3, 4])
        assert tiers.ssd is not None
        assert tiers.ssd.stats().writes == writes_before + 2  # 1 was dropped without a write
        assert tiers.stats().spills_clean == 1
        await tiers.close()

    run(scenario())


def test_no_promote_serves_from_a_transient_extent(node: StoreNode, tmp_path: Path) -> None:
    async def scenario() -> None:
        tiers = make_tiers(node, tmp_path, promote=False)
        fill(node, 0, 1, 2, 3, 4)
        await tiers.spill_to_low_watermark()
        used = node.stats().arena.used_bytes
        assert await read(tiers, 0) == block(0)
        assert in_dram(node) == [3, 4] and node.stats().arena.used_bytes == used
        assert (tiers.stats().promotions, tiers.stats().ssd_hits) == (0, 1)
        await tiers.close()

    run(scenario())


def test_concurrent_gets_share_one_promotion(node: StoreNode, tmp_path: Path) -> None:
    async def scenario() -> None:
        tiers = make_tiers(node, tmp_path)
        fill(node, 0, 1, 2, 3, 4)
        await tiers.spill_to_low_watermark()
        assert tiers.ssd is not None
        reads_before = tiers.ssd.stats().reads
        results = await asyncio.gather(*(read(tiers, 2) for _ in range(4)))
        assert results == [block(2)] * 4
        assert tiers.ssd.stats().reads == reads_before + 1
        assert (tiers.stats().promotions, tiers.stats().ssd_hits) == (1, 1)
        await tiers.close()

    run(scenario())


def test_delete_covers_both_tiers_and_cancels_a_promotion(node: StoreNode, tmp_path: Path) -> None:
    async def scenario() -> None:
        tiers = make_tiers(node, tmp_path)
        fill(node, 0, 1, 2, 3, 4)
        await tiers.spill_to_low_watermark()  # SSD: 0, 1, 2; DRAM: 3, 4
        fetch = asyncio.ensure_future(tiers.fetch(key(0)))
        await asyncio.sleep(0)  # the read of 0 is in flight; the GET came before the DELETE
        assert tiers.delete([key(0), key(1), key(3), key(9)]) == 3
        lease = await fetch
        assert lease is not None and bytes(lease.view) == block(0)  # the earlier GET is served
        node.release(lease)
        assert tiers.exists([key(n) for n in range(5)]) == [False, False, True, False, True]
        assert node.stats().arena.used_bytes == PAGE  # only 4: 0 did not come back to DRAM
        await tiers.close()
        ssd = SSDTier(str(tmp_path / "ssd"), 16 * 1024 * 1024, sync="none")
        assert sorted(int.from_bytes(k, "big") for k in ssd.iter_keys()) == [2]  # purged
        ssd.close()

    run(scenario())


def test_corrupt_ssd_block_is_a_miss_and_is_purged(node: StoreNode, tmp_path: Path) -> None:
    async def scenario() -> None:
        tiers = make_tiers(node, tmp_path)
        assert tiers.ssd is not None
        bad = bytearray(block(7))
        bad[2000] ^= 0x04
        tiers.ssd.put(key(7), bytes(bad))
        assert tiers.acquire(key(7)) is Tier.SSD
        assert await tiers.fetch(key(7)) is None
        assert (tiers.locate(key(7)), tiers.stats().misses) == (None, 1)
        assert node.stats().arena.used_bytes == 0  # the reserved extent was given back
        await tiers.close()  # the writer thread's purge has run
        ssd = SSDTier(str(tmp_path / "ssd"), 16 * 1024 * 1024, sync="none")
        assert (len(ssd), ssd.stats().audit_repaired) == (0, 0)
        ssd.close()

    run(scenario())


def test_background_spill_follows_the_watermarks(node: StoreNode, tmp_path: Path) -> None:
    async def scenario() -> None:
        tiers = make_tiers(node, tmp_path, high_watermark=0.75, low_watermark=0.5)
        tiers.start()
        fill(node, 0, 1, 2, 3, 4, 5)  # 6/8 = 0.75: not above the high watermark
        tiers.note_commit()
        await asyncio.sleep(0.05)
        assert tiers.stats().spills == 0
        fill(node, 6)
        tiers.note_commit()
        for _ in range(200):
            if node.arena_usage() <= 0.5:
                break
            await asyncio.sleep(0.01)
        assert (in_dram(node), on_ssd(tiers)) == ([3, 4, 5, 6], [0, 1, 2])
        await tiers.close()

    run(scenario())


def test_without_ssd_everything_is_dram_only(node: StoreNode) -> None:
    async def scenario() -> None:
        tiers = TierManager(node)
        tiers.start()
        fill(node, 0, 1)
        assert tiers.acquire(key(5)) is None
        assert tiers.match_prefix([key(0), key(1), key(2)]) == [Tier.DRAM, Tier.DRAM]
        assert tiers.delete([key(0)]) == 1
        assert await tiers.spill_to_low_watermark() == 0
        assert list(tiers.iter_keys(Tier.SSD)) == [] and list(tiers.iter_keys(Tier.DRAM)) == [
            key(1)
        ]
        stats = tiers.stats()
        assert (stats.misses, stats.ssd_blocks, stats.dram_blocks) == (1, 0, 1)
        await tiers.close()

    run(scenario())


# -- write-behind ----------------------------------------------------------------------------


def test_write_behind_copies_new_blocks_to_ssd_and_keeps_dram(
    node: StoreNode, tmp_path: Path
) -> None:
    async def scenario() -> tuple[int, list[int], list[int], int]:
        tiers = make_tiers(node, tmp_path, high_watermark=1.0, low_watermark=0.5, write_behind=True)
        fill(node, 1, 2, 3)
        for n in (1, 2, 3):
            tiers.note_commit(key(n))
        assert node.delete([key(2)]) == 1  # gone before its turn: skipped
        written = await tiers.persist_pending()
        again = await tiers.persist_pending()  # nothing queued twice
        result = (written, in_dram(node), on_ssd(tiers), again)
        await tiers.close()
        return result

    assert run(scenario()) == (2, [1, 3], [1, 3], 0)


def test_write_behind_does_not_count_as_an_access(node: StoreNode, tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        tiers = make_tiers(node, tmp_path, high_watermark=1.0, low_watermark=0.5, write_behind=True)
        fill(node, 1, 2)
        tiers.note_commit(key(1))
        await tiers.persist_pending()
        coldest = node.coldest_evictable()
        await tiers.close()
        return [int.from_bytes(coldest or b"", "big")]

    assert run(scenario()) == [1]


def test_write_through_resolves_each_put_once_its_block_is_on_ssd(
    node: StoreNode, tmp_path: Path
) -> None:
    async def scenario() -> tuple[list[bool], list[bool], list[int]]:
        tiers = make_tiers(
            node, tmp_path, high_watermark=1.0, low_watermark=0.5, write_through=True
        )
        assert tiers.write_through
        fill(node, 1, 2, 3)
        waits = []
        for n in (1, 2, 3):
            tiers.note_commit(key(n))
            waits.append(tiers.persisted(key(n)))
        assert node.delete([key(2)]) == 1  # gone before its turn, never on SSD: not durable
        before = [w.done() for w in waits]
        await tiers.persist_pending()
        after = [w.result() for w in waits]
        result = (before, after, on_ssd(tiers))
        await tiers.close()
        return result

    assert run(scenario()) == ([False, False, False], [True, False, True], [1, 3])


def test_write_through_of_a_block_already_on_ssd_is_durable_at_once(
    node: StoreNode, tmp_path: Path
) -> None:
    async def scenario() -> bool:
        tiers = make_tiers(
            node, tmp_path, high_watermark=1.0, low_watermark=0.5, write_through=True
        )
        fill(node, 1)
        tiers.note_commit(key(1))
        await tiers.persist_pending()
        tiers.note_commit(key(1))  # committed again (e.g. promoted back): already on SSD
        again = tiers.persisted(key(1))
        await tiers.persist_pending()
        result = again.result()
        await tiers.close()
        return result

    assert run(scenario()) is True


def test_write_through_waiters_are_answered_at_close(node: StoreNode, tmp_path: Path) -> None:
    async def scenario() -> tuple[bool, bool]:
        tiers = make_tiers(
            node, tmp_path, high_watermark=1.0, low_watermark=0.5, write_through=True
        )
        fill(node, 1)
        tiers.note_commit(key(1))
        pending = tiers.persisted(key(1))  # no persist task running: still waiting at close
        await tiers.close()
        late = tiers.persisted(key(1))  # asked after close: not durable
        return pending.done(), late.result()

    assert run(scenario()) == (True, False)


def test_a_failing_persist_pass_answers_and_unpins_what_it_took(
    node: StoreNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> tuple[list[bool], int]:
        tiers = make_tiers(
            node, tmp_path, high_watermark=1.0, low_watermark=0.5, write_through=True
        )
        fill(node, 1, 2)
        waits = []
        for n in (1, 2):
            tiers.note_commit(key(n))
            waits.append(tiers.persisted(key(n)))
        assert tiers.ssd is not None
        real = tiers.ssd.contains

        def contains(k: bytes) -> bool:
            if k == key(2):
                raise OSError("disk gone")
            return real(k)

        monkeypatch.setattr(tiers.ssd, "contains", contains)
        with pytest.raises(OSError, match="disk gone"):
            await tiers.persist_pending()
        monkeypatch.setattr(tiers.ssd, "contains", real)
        result = ([w.result() for w in waits], node.stats().num_leases)
        await tiers.close()
        return result

    # Block 1 was pinned for the batch, block 2 raised: both answered (not durable), none pinned.
    assert run(scenario()) == ([False, False], 0)


def test_without_write_through_nothing_waits(node: StoreNode, tmp_path: Path) -> None:
    async def scenario() -> bool:
        tiers = make_tiers(node, tmp_path, high_watermark=1.0, low_watermark=0.5, write_behind=True)
        assert not tiers.write_through
        result = tiers.persisted(key(1)).result()
        await tiers.close()
        return result

    assert run(scenario()) is False


def test_write_behind_off_writes_nothing(node: StoreNode, tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        tiers = make_tiers(node, tmp_path, high_watermark=1.0, low_watermark=0.5)
        fill(node, 1)
        tiers.note_commit(key(1))
        await tiers.persist_pending()
        result = on_ssd(tiers)
        await tiers.close()
        return result

    assert run(scenario()) == []
