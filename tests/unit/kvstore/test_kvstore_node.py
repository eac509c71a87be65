"""Exact tests of the store node: two-phase put, leases, LRU eviction order, delete."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.node.arena import Arena
from kvstore.node.store import Lease, PendingPut, StoreNode
from kvstore.wire.types import PutStatus

PAGE = 4096


def key(n: int) -> bytes:
    return n.to_bytes(16, "big")


def block(n: int, nbytes: int = PAGE) -> bytes:
    return bytes([n % 256]) * nbytes


@pytest.fixture
def node(tmp_path: Path) -> Iterator[StoreNode]:
    """A node whose arena holds exactly four one-page blocks."""
    arena = Arena(4 * PAGE, PAGE, directory=str(tmp_path), prefault=False)
    ticks = iter(range(1, 1_000_000))
    yield StoreNode(arena, clock=lambda: float(next(ticks)))
    arena.close()


def fill(node: StoreNode, *ns: int) -> None:
    for n in ns:
        assert node.put(key(n), block(n)) is PutStatus.OK


def stored(node: StoreNode) -> list[int]:
    return [n for n in range(10) if node.contains(key(n))]


def test_put_get_roundtrip_and_exists_is_noop(node: StoreNode) -> None:
    assert node.put(key(1), b"hello") is PutStatus.OK
    assert node.put(key(1), b"other") is PutStatus.EXISTS
    assert node.get(key(1)) == b"hello"
    assert node.get(key(2)) is None
    stats = node.stats()
    assert (stats.num_blocks, stats.stored_bytes, stats.puts, stats.puts_exists) == (1, 5, 1, 1)
    assert (stats.hits, stats.misses, stats.arena.used_bytes) == (1, 1, PAGE)


def test_lru_evicts_exact_order(node: StoreNode) -> None:
    fill(node, 0, 1, 2, 3)
    fill(node, 4)  # evicts 0, the least recently used
    assert stored(node) == [1, 2, 3, 4]
    assert node.get(key(1)) is not None  # 1 becomes most recent: order 2, 3, 4, 1
    fill(node, 5)  # evicts 2: order 3, 4, 1, 5
    assert stored(node) == [1, 3, 4, 5]
    assert node.put(key(3), block(3)) is PutStatus.EXISTS  # an access: order 4, 1, 5, 3
    fill(node, 6)  # evicts 4
    assert stored(node) == [1, 3, 5, 6]
    fill(node, 7)  # evicts 1
    assert stored(node) == [3, 5, 6, 7]
    assert node.stats().evictions == 4


def test_lookups_do_not_change_recency(node: StoreNode) -> None:
    fill(node, 0, 1, 2, 3)
    assert node.match_prefix([key(0), key(1), key(9), key(2)]) == 2
    assert node.exists([key(0), key(9)]) == [True, False]
    fill(node, 4)
    assert stored(node) == [1, 2, 3, 4]


def test_large_block_evicts_as_many_as_needed(node: StoreNode) -> None:
    fill(node, 0, 1, 2, 3)
    assert node.put(key(8), block(8, 2 * PAGE)) is PutStatus.OK
    assert stored(node) == [2, 3, 8]


def test_leased_blocks_are_skipped_by_eviction(node: StoreNode) -> None:
    fill(node, 0, 1, 2, 3)
    lease = node.acquire(key(0))
    assert lease is not None  # 0 is now most recent too: order 1, 2, 3, 0
    node.acquire(key(1))  # order 2, 3, 0, 1; 0 and 1 leased
    fill(node, 4)
    assert stored(node) == [0, 1, 3, 4]
    fill(node, 5)  # 3 is the coldest unleased
    assert stored(node) == [0, 1, 4, 5]


def test_full_when_everything_is_leased_or_being_written(node: StoreNode) -> None:
    fill(node, 0, 1)
    leases = [node.acquire(key(0)), node.acquire(key(1))]
    pending = [node.begin_put(key(2), PAGE), node.begin_put(key(3), PAGE)]
    assert all(isinstance(p, PendingPut) for p in pending)
    assert node.put(key(4), block(4)) is PutStatus.FULL
    assert node.put(key(5), block(5, 5 * PAGE)) is PutStatus.FULL  # larger than the arena
    assert stored(node) == [0, 1]
    assert node.stats().puts_full == 2
    for lease in leases:
        assert lease is not None
        node.release(lease)
    assert node.put(key(4), block(4)) is PutStatus.OK
    assert stored(node) == [1, 4]


def test_two_phase_put_visibility_commit_and_revoke(node: StoreNode) -> None:
    pending = node.begin_put(key(1), 3)
    assert isinstance(pending, PendingPut)
    assert pending.view.nbytes == 3
    # Invisible while writing; a second writer is told the key exists.
    assert node.get(key(1)) is None
    assert node.match_prefix([key(1)]) == 0
    assert node.begin_put(key(1), 3) is PutStatus.EXISTS
    assert node.delete([key(1)]) == 0
    pending.view[:] = b"abc"
    node.commit(pending)
    assert node.get(key(1)) == b"abc"
    with pytest.raises(ValueError):
        node.commit(pending)
    assert node.revoke(pending) is False

    abandoned = node.begin_put(key(2), PAGE)
    assert isinstance(abandoned, PendingPut)
    assert node.stats().num_writing == 1
    assert node.revoke(abandoned) is True
    stats = node.stats()
    assert (stats.num_writing, stats.puts_revoked, stats.arena.used_bytes) == (0, 1, PAGE)
    assert node.get(key(2)) is None


def test_stale_pending_put_cannot_commit_a_newer_write(node: StoreNode) -> None:
    first = node.begin_put(key(1), 4)
    assert isinstance(first, PendingPut)
    node.revoke(first)
    second = node.begin_put(key(1), 4)
    assert isinstance(second, PendingPut)
    with pytest.raises(ValueError):
        node.commit(first)
    second.view[:] = b"good"
    node.commit(second)
    assert node.get(key(1)) == b"good"


def test_delete_of_leased_block_frees_at_last_release(node: StoreNode) -> None:
    fill(node, 0, 1)
    first = node.acquire(key(0))
    second = node.acquire(key(0))
    assert isinstance(first, Lease) and isinstance(second, Lease)
    assert node.delete([key(0), key(0), key(9)]) == 1
    assert node.get(key(0)) is None
    assert node.stats().arena.used_bytes == 2 * PAGE  # still pinned
    assert bytes(first.view) == block(0)  # the reader's bytes are intact
    node.release(first)
    assert node.stats().arena.used_bytes == 2 * PAGE
    node.release(second)
    stats = node.stats()
    assert (stats.arena.used_bytes, stats.num_blocks, stats.num_leases, stats.deletes) == (
        PAGE,
        1,
        0,
        1,
    )
    with pytest.raises(ValueError):
        node.release(second)
    # The key can be stored again at once.
    assert node.put(key(0), b"new") is PutStatus.OK


def test_lease_exposes_offset_and_size(node: StoreNode) -> None:
    fill(node, 0)
    node.put(key(1), b"xyz")
    lease = node.acquire(key(1))
    assert lease is not None
    assert (lease.key, lease.offset, lease.nbytes, bytes(lease.view)) == (key(1), PAGE, 3, b"xyz")
    node.release(lease)


def test_invalid_arguments(node: StoreNode) -> None:
    with pytest.raises(ValueError):
        node.begin_put(b"short", 10)
    with pytest.raises(ValueError):
        node.begin_put(key(1), 0)
