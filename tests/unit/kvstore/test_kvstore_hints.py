"""HintedHolders: the bounded, expiring map of blocks hinted peers hold (kvstore.cluster.hints)."""

from __future__ import annotations

import pytest

from kvstore.blocks.tier import Tier
from kvstore.cluster.hints import DEFAULT_HINT_CAPACITY, DEFAULT_HINT_TTL_S, HintedHolders
from tests.fakes import FakeClock


def key(n: int) -> bytes:
    return n.to_bytes(16, "big")


def test_what_was_added_is_found_with_its_node_and_tier() -> None:
    hinted = HintedHolders(clock=FakeClock(100.0))
    hinted.add("a", [key(0), key(1)], [Tier.DRAM, Tier.SSD])
    assert hinted.holder(key(0)) == ("a", Tier.DRAM)
    assert hinted.holder(key(1)) == ("a", Tier.SSD)
    assert hinted.holder(key(2)) is None
    hinted.add("b", [key(1)], [Tier.DRAM])  # the latest answer wins
    assert hinted.holder(key(1)) == ("b", Tier.DRAM)
    assert len(hinted) == 2
    assert (
        (hinted.ttl_s, hinted.capacity)
        == (DEFAULT_HINT_TTL_S, DEFAULT_HINT_CAPACITY)
        == (
            30.0,
            4096,
        )
    )


def test_entries_expire_after_the_ttl() -> None:
    clock = FakeClock(100.0)
    hinted = HintedHolders(ttl_s=30.0, clock=clock)
    hinted.add("a", [key(0)], [Tier.DRAM])
    clock.now += 10.0
    hinted.add("a", [key(1)], [Tier.DRAM])
    clock.now += 19.999
    assert hinted.holder(key(0)) == ("a", Tier.DRAM)  # 29.999 s old
    clock.now += 0.001
    assert hinted.holder(key(0)) is None  # 30 s: gone, and dropped
    assert len(hinted) == 1
    assert hinted.holder(key(1)) == ("a", Tier.DRAM)
    clock.now += 10.0
    hinted.add("b", [key(2)], [Tier.SSD])  # an add drops what expired meanwhile
    assert len(hinted) == 1
    assert hinted.holder(key(1)) is None


def test_re_adding_a_key_renews_it() -> None:
    clock = FakeClock(100.0)
    hinted = HintedHolders(ttl_s=30.0, clock=clock)
    hinted.add("a", [key(0), key(1)], [Tier.DRAM, Tier.DRAM])
    clock.now += 20.0
    hinted.add("a", [key(0)], [Tier.DRAM])
    clock.now += 15.0
    assert hinted.holder(key(0)) == ("a", Tier.DRAM)
    assert hinted.holder(key(1)) is None


def test_the_oldest_keys_go_beyond_the_capacity() -> None:
    clock = FakeClock(100.0)
    hinted = HintedHolders(capacity=3, clock=clock)
    hinted.add("a", [key(0), key(1)], [Tier.DRAM, Tier.DRAM])
    clock.now += 1.0
    hinted.add("a", [key(2), key(3)], [Tier.DRAM, Tier.DRAM])
    assert len(hinted) == 3
    assert [hinted.holder(key(n)) is not None for n in range(4)] == [False, True, True, True]
    hinted.add("b", [key(n) for n in range(10, 20)], [Tier.SSD] * 10)  # one call beyond it
    assert len(hinted) == 3
    assert [hinted.holder(key(n)) for n in (17, 18, 19)] == [("b", Tier.SSD)] * 3


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        HintedHolders(ttl_s=0)
    with pytest.raises(ValueError):
        HintedHolders(capacity=0)
    with pytest.raises(ValueError):
        HintedHolders().add("a", [key(0)], [])
