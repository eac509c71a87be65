"""Exact tests of the page allocator and the /dev/shm arena (kvstore.node.arena)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from kvstore.node.arena import Arena, ArenaStats, Extent, PageAllocator, remove_stale_arenas

PAGE = 4096


def test_best_fit_prefers_smallest_hole_then_lowest_address() -> None:
    alloc = PageAllocator(16 * PAGE, PAGE)
    a = alloc.allocate(PAGE)  # pages 0
    b = alloc.allocate(3 * PAGE)  # pages 1-3
    c = alloc.allocate(PAGE)  # page 4
    d = alloc.allocate(2 * PAGE)  # pages 5-6
    e = alloc.allocate(PAGE)  # page 7
    assert [x.offset // PAGE for x in (a, b, c, d, e) if x] == [0, 1, 4, 5, 7]
    assert b is not None and d is not None
    alloc.free(b)  # hole of 3 pages at 1
    alloc.free(d)  # hole of 2 pages at 5
    # 2 pages: the 2-page hole at 5 beats the 3-page hole at 1 and the 8-page tail at 8.
    assert alloc.allocate(2 * PAGE) == Extent(5 * PAGE, 2 * PAGE)
    # 1 page: the 3-page hole is now the smallest fit.
    assert alloc.allocate(1) == Extent(1 * PAGE, PAGE)
    alloc.check_invariants()


def test_sizes_round_up_to_pages() -> None:
    alloc = PageAllocator(4 * PAGE, PAGE)
    assert alloc.allocate(1) == Extent(0, PAGE)
    assert alloc.allocate(PAGE + 1) == Extent(PAGE, 2 * PAGE)
    assert alloc.stats() == ArenaStats(4 * PAGE, 3 * PAGE, PAGE, PAGE, 2, 1)


def test_full_and_fragmented_allocations_fail_cleanly() -> None:
    alloc = PageAllocator(4 * PAGE, PAGE)
    extents = [alloc.allocate(PAGE) for _ in range(4)]
    assert alloc.allocate(1) is None
    assert extents[0] is not None and extents[2] is not None
    alloc.free(extents[0])
    alloc.free(extents[2])
    stats = alloc.stats()
    assert (stats.free_bytes, stats.largest_free_bytes, stats.num_free_extents) == (
        2 * PAGE,
        PAGE,
        2,
    )
    assert alloc.allocate(2 * PAGE) is None  # free, but not contiguous
    alloc.check_invariants()


def test_coalescing_on_both_sides() -> None:
    alloc = PageAllocator(3 * PAGE, PAGE)
    a, b, c = (alloc.allocate(PAGE) for _ in range(3))
    assert a is not None and b is not None and c is not None
    alloc.free(a)
    alloc.free(c)
    alloc.free(b)  # merges left and right
    assert alloc.stats() == ArenaStats(3 * PAGE, 0, 3 * PAGE, 3 * PAGE, 0, 1)
    assert alloc.allocate(3 * PAGE) == Extent(0, 3 * PAGE)


def test_double_and_foreign_free_rejected() -> None:
    alloc = PageAllocator(4 * PAGE, PAGE)
    a = alloc.allocate(2 * PAGE)
    assert a is not None
    with pytest.raises(ValueError):
        alloc.free(Extent(a.offset, PAGE))  # wrong size
    with pytest.raises(ValueError):
        alloc.free(Extent(100, PAGE))  # not page aligned
    alloc.free(a)
    with pytest.raises(ValueError):
        alloc.free(a)
    with pytest.raises(ValueError):
        alloc.allocate(0)


@pytest.mark.parametrize(("capacity", "page"), [(0, PAGE), (PAGE + 1, PAGE), (PAGE, 3000)])
def test_bad_geometry_rejected(capacity: int, page: int) -> None:
    with pytest.raises(ValueError):
        PageAllocator(capacity, page)


def test_100k_random_operations_recover_all_memory_without_overlap() -> None:
    """Long random put/delete run: no overlap at any point, no fragmentation left at the end."""
    capacity_pages = 4096
    alloc = PageAllocator(capacity_pages * PAGE, PAGE)
    rng = random.Random(1234)
    sizes = [64 * 1024 + 64, 256 * 1024 + 64, 2 * 1024 * 1024 + 64, 1, 5000]
    live: list[Extent] = []
    owner = bytearray(capacity_pages)  # page -> 1 if owned; catches any overlap immediately
    failures = 0
    for step in range(100_000):
        if live and (rng.random() < 0.5 or len(live) > 200):
            extent = live.pop(rng.randrange(len(live)))
            first, n = extent.offset // PAGE, extent.size // PAGE
            assert owner[first : first + n] == b"\x01" * n
            owner[first : first + n] = bytes(n)
            alloc.free(extent)
        else:
            nbytes = rng.choice(sizes)
            extent_or_none = alloc.allocate(nbytes)
            if extent_or_none is None:
                failures += 1
                assert alloc.stats().largest_free_bytes < nbytes
                continue
            extent = extent_or_none
            first, n = extent.offset // PAGE, extent.size // PAGE
            assert extent.size >= nbytes and extent.offset + extent.size <= capacity_pages * PAGE
            assert owner[first : first + n] == bytes(n), "allocation overlaps a live extent"
            owner[first : first + n] = b"\x01" * n
            live.append(extent)
        if step % 10_000 == 0:
            alloc.check_invariants()
    assert failures > 0  # the run really exercised a full arena
    for extent in live:
        alloc.free(extent)
    alloc.check_invariants()
    assert alloc.stats() == ArenaStats(
        capacity_pages * PAGE, 0, capacity_pages * PAGE, capacity_pages * PAGE, 0, 1
    )


def test_arena_is_a_shared_file_and_views_are_live(tmp_path: Path) -> None:
    with Arena(16 * PAGE, PAGE, directory=str(tmp_path), prefault=True) as arena:
        assert os.path.getsize(arena.path) == 16 * PAGE
        assert oct(os.stat(arena.path).st_mode & 0o777) == "0o600"
        extent = arena.allocate(10)
        assert extent == Extent(0, PAGE)
        view = arena.view(extent, 10)
        view[:] = b"0123456789"
        with open(arena.path, "rb") as f:  # same pages, seen through the file
            assert f.read(10) == b"0123456789"
        assert arena.view(extent).nbytes == PAGE
        with pytest.raises(ValueError):
            arena.view(extent, PAGE + 1)
        del view
        arena.free(extent)
        assert arena.stats().used_bytes == 0
        path = arena.path
    assert not os.path.exists(path)
    assert arena.closed
    arena.close()  # idempotent


def test_arena_close_with_outstanding_view_still_removes_file(tmp_path: Path) -> None:
    arena = Arena(4 * PAGE, PAGE, directory=str(tmp_path), prefault=False)
    extent = arena.allocate(PAGE)
    assert extent is not None
    view = arena.view(extent)
    arena.close()
    assert not os.path.exists(arena.path)
    view[0] = 7  # still mapped until released
    view.release()


def test_arena_name_collision_refused(tmp_path: Path) -> None:
    with (
        Arena(PAGE, PAGE, directory=str(tmp_path), name="x", prefault=False),
        pytest.raises(FileExistsError),
    ):
        Arena(PAGE, PAGE, directory=str(tmp_path), name="x", prefault=False)


def test_remove_stale_arenas_only_removes_unlocked_old_files(tmp_path: Path) -> None:
    directory = str(tmp_path)
    dead_pid = 2**22 + 12345  # above pid_max's default ceiling: never a live process
    old = time.time() - 3600

    def make(name: str, age: float = old) -> Path:
        path = tmp_path / name
        path.write_bytes(b"")
        os.utime(path, (age, age))
        return path

    stale = make(f"strata-kvstore-{dead_pid}-0000aaaa")
    recent = make(f"strata-kvstore-{dead_pid}-0000bbbb", age=time.time())
    # A live pid in the name (a node of another pid namespace that died, its pid now ours):
    # stale all the same, since nobody holds its lock.
    reused_pid = make(f"strata-kvstore-{os.getpid()}-0000cccc")
    unrelated = make("something-else")
    custom = make("strata-kvstore-custom")
    with Arena(PAGE, PAGE, directory=directory, prefault=False) as live:
        os.utime(live.path, (old, old))
        # Even under a dead owner's name, a locked file belongs to a live node.
        locked_under_dead_name = tmp_path / f"strata-kvstore-{dead_pid}-0000dddd"
        os.link(live.path, locked_under_dead_name)
        assert sorted(remove_stale_arenas(directory)) == sorted([str(stale), str(reused_pid)])
        assert os.path.exists(live.path)
        assert locked_under_dead_name.exists()
        locked_under_dead_name.unlink()
    for path in (recent, unrelated, custom):
        assert path.exists()
    assert not stale.exists() and not reused_pid.exists()
