"""Exact tests of the eviction policies (kvstore.policy): LRU, S3-FIFO, ARC, SIEVE."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvstore.node.arena import Arena
from kvstore.node.store import StoreNode
from kvstore.policy.admitted import AdmittedPolicy
from kvstore.policy.arc import ARCPolicy
from kvstore.policy.base import EvictionPolicy
from kvstore.policy.factory import PolicyKind, make_policy
from kvstore.policy.lru import LRUPolicy
from kvstore.policy.s3fifo import S3FIFOPolicy
from kvstore.policy.sieve import SIEVEPolicy
from kvstore.wire.types import PutStatus


def _keys(*names: str) -> list[bytes]:
    return [name.encode().ljust(16, b"\0") for name in names]


def test_lru_order_follows_insert_and_access() -> None:
    policy: EvictionPolicy = LRUPolicy()
    a, b, c = _keys("a", "b", "c")
    for key in (a, b, c):
        policy.on_insert(key)
    assert policy.select_victim(lambda k: True) == a
    policy.on_access(a)
    assert policy.select_victim(lambda k: True) == b
    policy.on_remove(b)
    assert policy.select_victim(lambda k: True) == c
    assert len(policy) == 2


def test_select_skips_refused_keys_and_does_not_mutate() -> None:
    policy = LRUPolicy()
    a, b, c = _keys("a", "b", "c")
    for key in (a, b, c):
        policy.on_insert(key)
    assert policy.select_victim(lambda k: k != a) == b
    assert policy.select_victim(lambda k: k != a) == b  # selection alone changes nothing
    assert policy.select_victim(lambda k: False) is None
    assert len(policy) == 3


def test_unknown_keys_are_ignored() -> None:
    policy = LRUPolicy()
    (a,) = _keys("a")
    policy.on_access(a)
    policy.on_remove(a)
    assert len(policy) == 0
    assert policy.select_victim(lambda k: True) is None


# -- every policy: exact eviction orders ---------------------------------------------------------


def simulate(policy: EvictionPolicy, capacity: int, trace: str) -> list[str]:
    """Replay accesses to single-letter keys through a cache of ``capacity`` blocks.

    A hit is an ``on_access``; a miss evicts (``select_victim`` then ``on_remove``) until there
    is room, then ``on_insert`` -- what the store node does. Returns the evicted keys in order.
    """
    evicted: list[str] = []
    for name in trace.split():
        key = name.encode()
        if key in tracked(policy):
            policy.on_access(key)
            continue
        while len(policy) >= capacity:
            victim = policy.select_victim(lambda k: True)
            assert victim is not None
            policy.on_remove(victim)
            evicted.append(victim.decode())
        policy.on_insert(key)
    return evicted


def tracked(policy: EvictionPolicy) -> set[bytes]:
    """The keys a policy tracks (white box; the protocol does not expose them)."""
    if isinstance(policy, LRUPolicy):
        return set(policy._order)
    if isinstance(policy, S3FIFOPolicy):
        return set(policy._freq)
    if isinstance(policy, ARCPolicy):
        return set(policy._t1) | set(policy._t2)
    if isinstance(policy, AdmittedPolicy):
        return set(policy._window) | tracked(policy.main)
    assert isinstance(policy, SIEVEPolicy)
    return set(policy._nodes)


EVICTION_ORDERS = [
    # (policy, capacity, trace, evicted in order, tracked at the end)
    ("LRU: an access protects a key", PolicyKind.LRU, 3, "a b c a d b e", "b c a", "d b e"),
    (
        "LRU: the same trace as S3-FIFO's promotion case",
        PolicyKind.LRU,
        4,
        "a b c d a b c d e b b c f g g h h i",
        "a d e b c",
        "f g h i",
    ),
    # S3-FIFO, 10 % small queue: with 3-4 keys, small is evicted from whenever it is non-empty.
    (
        "S3-FIFO: accessed keys move to main, one-hit wonders go",
        PolicyKind.S3_FIFO,
        3,
        "a b c a d b e",
        "b c d",
        "a b e",
    ),
    # a b c d all hit once -> at e all move to main with frequency 0, main's oldest (a) goes;
    # b hit twice, c once; f, g evict e, f from small; g hit; at h g moves to main, main
    # reinserts b (2 -> 1) and c (1 -> 0) and evicts d; h hit; at i h moves to main and g goes.
    (
        "S3-FIFO: promotion to main, then main's 2-bit CLOCK",
        PolicyKind.S3_FIFO,
        4,
        "a b c d a b c d e b b c f g g h h i",
        "a e f d g",
        "b c h i",
    ),
    # a is evicted from small into the ghost; back soon, it enters main and outlives the small
    # queue's later one-hit wonders.
    (
        "S3-FIFO: a ghost hit goes straight to main",
        PolicyKind.S3_FIFO,
        4,
        "a b c d e a f g h i",
        "a b c d e f",
        "a g h i",
    ),
    # c=3. At d: |T1|=2 > p=0 -> T1's LRU b -> B1. At b (ghost in B1): T1's c goes, p += 1,
    # b enters T2. At e: |T1|=1 is not > p=1 -> T2's LRU a -> B2. At a (ghost in B2): T1's d
    # goes (|T1|=2 > 1), p -= 2 -> 0, a enters T2. At f: T1's e goes.
    ("ARC: ghost hits steer p", PolicyKind.ARC, 3, "a b c a d b e a f", "b c a d e", "b a f"),
    # a, b visited; at d the hand clears a and b and evicts c (the newest), then wraps: at e the
    # oldest (a, no longer visited) goes, at c b goes. Survivors never move.
    ("SIEVE: the hand sweeps and wraps", PolicyKind.SIEVE, 3, "a b c a b d e c", "c a b", "d e c"),
    ("SIEVE: a visited key survives a pass", PolicyKind.SIEVE, 3, "a b c a d", "b", "a c d"),
]


@pytest.mark.parametrize(
    ("kind", "capacity", "trace", "evicted", "survivors"),
    [case[1:] for case in EVICTION_ORDERS],
    ids=[case[0] for case in EVICTION_ORDERS],
)
def test_eviction_order(
    kind: PolicyKind, capacity: int, trace: str, evicted: str, survivors: str
) -> None:
    policy = make_policy(kind)
    assert simulate(policy, capacity, trace) == evicted.split()
    assert tracked(policy) == {name.encode() for name in survivors.split()}
    assert len(policy) == len(survivors.split())


def test_arc_adapts_its_target() -> None:
    policy = ARCPolicy()
    simulate(policy, 3, "a b c a d b")
    assert policy.target_t1 == 1.0  # a B1 ghost hit grew p by max(|B2|/|B1|, 1) = 1
    simulate(policy, 3, "e a")
    assert policy.target_t1 == 0.0  # a B2 ghost hit shrank it by max(|B1|/|B2|, 1) = 2, floor 0


def test_s3fifo_ghost_is_bounded() -> None:
    policy = S3FIFOPolicy()
    simulate(policy, 10, " ".join(f"k{i}" for i in range(100)))
    assert len(policy._ghost) == 8  # int(0.9 * 9 tracked at the last removal)


@pytest.mark.parametrize("kind", list(PolicyKind))
def test_make_policy_builds_each_kind(kind: PolicyKind) -> None:
    expected = {
        PolicyKind.LRU: LRUPolicy,
        PolicyKind.S3_FIFO: S3FIFOPolicy,
        PolicyKind.ARC: ARCPolicy,
        PolicyKind.SIEVE: SIEVEPolicy,
        PolicyKind.W_TINYLFU: AdmittedPolicy,
        PolicyKind.SECOND_HIT_LRU: AdmittedPolicy,
    }
    policy = make_policy(kind)
    assert type(policy) is expected[kind]
    assert PolicyKind(kind.value) is kind  # configuration names round-trip


def test_make_policy_refuses_strings() -> None:
    with pytest.raises(TypeError):
        make_policy("lru")  # type: ignore[arg-type]


# -- every policy: the protocol's guarantees ----------------------------------------------------


@pytest.mark.parametrize("kind", list(PolicyKind))
def test_refused_keys_are_passed_over(kind: PolicyKind) -> None:
    policy = make_policy(kind)
    a, b, c = _keys("a", "b", "c")
    for key in (a, b, c):
        policy.on_insert(key)
    first = policy.select_victim(lambda k: True)
    assert first is not None
    second = policy.select_victim(lambda k: k != first)
    assert second is not None and second != first
    assert policy.select_victim(lambda k: k != first) == second  # same answer again
    assert policy.select_victim(lambda k: False) is None
    assert len(policy) == 3
    policy.on_remove(second)
    assert len(policy) == 2
    assert policy.select_victim(lambda k: k == second) is None  # forgotten


@pytest.mark.parametrize("kind", list(PolicyKind))
def test_unknown_and_repeated_keys(kind: PolicyKind) -> None:
    policy = make_policy(kind)
    (a,) = _keys("a")
    policy.on_access(a)
    policy.on_remove(a)
    assert len(policy) == 0 and policy.select_victim(lambda k: True) is None
    policy.on_insert(a)
    policy.on_insert(a)  # a re-put of a tracked key is an access
    assert len(policy) == 1 and policy.select_victim(lambda k: True) == a


@pytest.mark.parametrize("kind", list(PolicyKind))
@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_keep_the_protocol(kind: PolicyKind, seed: int) -> None:
    """Whatever happens, a victim is found iff some tracked key is evictable, and it is one."""
    rng = random.Random(seed)
    policy = make_policy(kind)
    live: set[bytes] = set()
    names = [f"k{i}".encode() for i in range(40)]
    for _ in range(3000):
        key = rng.choice(names)
        roll = rng.random()
        if roll < 0.4:
            if key not in live:
                policy.on_insert(key)
                live.add(key)
        elif roll < 0.7:
            policy.on_access(key)
        elif roll < 0.8:
            policy.on_remove(key)
            live.discard(key)
        else:
            leased = set(rng.sample(names, rng.randint(0, 40)))
            victim = policy.select_victim(lambda k, leased=leased: k not in leased)  # type: ignore[misc]
            if live - leased:
                assert victim in live - leased
                if rng.random() < 0.7:
                    policy.on_remove(victim)
                    live.discard(victim)
            else:
                assert victim is None
        assert len(policy) == len(live)
        assert tracked(policy) == live


@pytest.mark.parametrize("kind", list(PolicyKind))
def test_each_policy_drives_a_store_node(kind: PolicyKind, tmp_path: Path) -> None:
    """Injected into a real StoreNode: leased blocks survive, puts keep succeeding."""
    page = 4096
    arena = Arena(4 * page, page, directory=str(tmp_path), prefault=False)
    try:
        node = StoreNode(arena, policy=make_policy(kind))
        keys = [i.to_bytes(16, "big") for i in range(40)]
        assert node.put(keys[0], b"x" * page) is PutStatus.OK
        lease = node.acquire(keys[0])
        assert lease is not None
        for i, key in enumerate(keys[1:], start=1):
            assert node.put(key, bytes([i]) * page) is PutStatus.OK
            if i % 3 == 0:
                assert node.get(key) is not None  # an access
            assert node.contains(keys[0])  # leased: never evicted
        assert node.stats().num_blocks == 4
        node.release(lease)
        for key in keys[:8]:
            node.put(key, b"y" * page)
        assert node.stats().num_blocks == 4
    finally:
        arena.close()
