"""CorePool: which cores the local-process launcher gives each engine (exact assignments)."""

from __future__ import annotations

import pytest

from controlplane.instances.types import InstanceConflict
from controlplane.launch.launcher import CorePool
from controlplane.launch.processes import moved_affinity


@pytest.mark.parametrize(
    ("cpus", "num_cores", "launches", "expected"),
    [
        # 2 cores, 1 per engine: the first two are exclusive, then the least-used core is shared.
        ((0, 1), 1, 5, [(0,), (1,), (0,), (1,), (0,)]),
        # 4 cores, 2 per engine.
        ((0, 1, 2, 3), 2, 3, [(0, 1), (2, 3), (0, 1)]),
        # The pool is the affinity set, in any order and with gaps.
        ((7, 3, 5), 1, 4, [(3,), (5,), (7,), (3,)]),
        # 3 cores, 2 per engine: the second engine gets the free core plus the least-used one.
        ((0, 1, 2), 2, 2, [(0, 1), (0, 2)]),
    ],
)
def test_allocation_order(
    cpus: tuple[int, ...], num_cores: int, launches: int, expected: list[tuple[int, ...]]
) -> None:
    pool = CorePool(cpus, share_cores=True)
    assert [pool.allocate(num_cores) for _ in range(launches)] == expected


def test_released_cores_are_reused_first() -> None:
    pool = CorePool((0, 1, 2), share_cores=True)
    a, b, c = pool.allocate(1), pool.allocate(1), pool.allocate(1)
    assert (a, b, c) == ((0,), (1,), (2,))
    pool.release(b)
    assert [pool.users(cpu) for cpu in pool.cpus] == [1, 0, 1]
    assert pool.allocate(1) == (1,)
    pool.allocate(1)  # all taken: shares core 0
    pool.release((0,))
    pool.release((0,))
    assert [pool.users(cpu) for cpu in pool.cpus] == [0, 1, 1]
    assert pool.allocate(1) == (0,)


def test_without_sharing_a_full_pool_refuses_and_changes_nothing() -> None:
    pool = CorePool((0, 1), share_cores=False)
    assert pool.allocate(1) == (0,)
    assert pool.allocate(1) == (1,)
    with pytest.raises(InstanceConflict, match="no free cores"):
        pool.allocate(1)
    assert [pool.users(cpu) for cpu in pool.cpus] == [1, 1]
    pool.release((1,))
    assert pool.allocate(1) == (1,)


def test_misuse_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        CorePool((), share_cores=True)
    pool = CorePool((0, 1), share_cores=True)
    with pytest.raises(ValueError, match="num_cores"):
        pool.allocate(0)
    with pytest.raises(ValueError, match="num_cores"):
        pool.allocate(3)
    with pytest.raises(ValueError, match="not allocated"):
        pool.release((0,))
    with pytest.raises(ValueError, match="not allocated"):
        pool.release((9,))


@pytest.mark.parametrize(
    ("affinity", "old", "new", "expected"),
    [
        ({0}, 0, 1, {1}),  # a one-core engine's OpenMP thread
        ({2}, 2, 5, {5}),  # one OpenMP thread of a 2-core engine on (2, 3)
        ({3}, 2, 5, None),  # its other thread stays
        ({2, 3}, 2, 5, {3, 5}),  # a thread that inherited the engine's whole set
        ({0, 1}, 3, 2, None),  # does not hold the core that is moved
    ],
)
def test_a_moved_engine_thread_swaps_exactly_the_moved_core(
    affinity: set[int], old: int, new: int, expected: set[int] | None
) -> None:
    assert moved_affinity(affinity, old, new) == expected


def test_rebalancing_moves_the_newest_engine_off_a_shared_core_onto_a_free_one() -> None:
    pool = CorePool((0, 1, 2), share_cores=True)
    holdings = [pool.allocate(1) for _ in range(4)]  # (0,), (1,), (2,), (0,)
    assert holdings == [(0,), (1,), (2,), (0,)]
    assert pool.rebalance_move(holdings) is None  # no core is free
    pool.release(holdings.pop(1))  # core 1 frees up
    assert pool.rebalance_move(holdings) == (2, 0, 1)  # the newest on core 0 takes it
    pool.move(0, 1)
    holdings[2] = (1,)
    assert [pool.users(c) for c in pool.cpus] == [1, 1, 1]
    assert pool.rebalance_move(holdings) is None
