"""Exact tests of the LRU eviction policy (kvstore.policy)."""

from __future__ import annotations

from kvstore.policy import EvictionPolicy, LRUPolicy


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
