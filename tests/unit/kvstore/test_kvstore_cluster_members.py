"""Member kinds: store nodes and engines both heartbeat and are reaped; only stores are peers."""

from __future__ import annotations

from typing import Any

import pytest

from kvstore.blocks.tier import Tier
from kvstore.cluster.events import (
    SOURCE_GONE_SEQ,
    BlocksStored,
    SourceCleared,
    SourceSnapshot,
    decode_event,
    encode_event,
    encode_snapshot,
)
from kvstore.cluster.membership import Membership
from kvstore.cluster.view import ClusterView
from kvstore.metadata import START, EmbeddedMetadataStore, MemberKind, member_kind
from tests.fakes import FakeClock
from tests.unit.kvstore.fakes import k


def sync(view: ClusterView) -> None:
    view.poll_once(0.001)
    view.refresh_membership()


def stream(store: EmbeddedMetadataStore) -> list[object]:
    _, messages = store.read(START, 0.0, count=10_000)
    return [decode_event(m) if m[1] != 4 else "snapshot" for m in messages]


@pytest.mark.parametrize(
    ("info", "kind"),
    [
        ({"endpoint": "h:1"}, MemberKind.STORE),  # registered before kinds existed
        ({"kind": "store"}, MemberKind.STORE),
        ({"kind": "engine"}, MemberKind.ENGINE),
        ({"kind": "gateway"}, None),  # a newer peer's kind: neither
        ({"kind": ["engine"]}, None),
        ({"kind": None}, None),
    ],
)
def test_member_kind(info: dict[str, Any], kind: MemberKind | None) -> None:
    assert member_kind(info) is kind


def test_live_nodes_lists_only_stores_and_live_engines_only_engines() -> None:
    clock = FakeClock()
    store = EmbeddedMetadataStore(clock=clock)
    members = {
        "old": {"endpoint": "old:1"},
        "s": {"endpoint": "s:1", "kind": "store"},
        "e": {"endpoint": "e:1", "kind": "engine"},
        "g": {"endpoint": "g:1", "kind": "gateway"},
        "dead-engine": {"endpoint": "d:1", "kind": "engine"},
    }
    for node, info in members.items():
        store.heartbeat(node, 5.0)
        store.register(node, info)
    store.heartbeat("dead-engine", -1.0)  # expired
    view = ClusterView(store, clock=clock, reap_dead=False)
    sync(view)
    assert view.live_nodes() == {"old": "old:1", "s": "s:1"}
    assert view.live_engines() == {"e": "e:1"}
    assert view.live_members(MemberKind.ENGINE) == {"e": "e:1"}


def test_membership_registers_alive_first_with_its_kind_and_rejoins_after_a_reap() -> None:
    clock = FakeClock()
    store = EmbeddedMetadataStore(clock=clock)
    member = Membership(
        store, "e", MemberKind.ENGINE, {"endpoint": "e:1", "kind": "store"}, heartbeat_timeout_s=2
    )
    store.request_resync("e")  # left over from a previous incarnation
    member.register()
    info = store.members()["e"]
    assert (info["endpoint"], info["kind"]) == ("e:1", "engine")  # the given kind cannot lie
    assert store.alive(["e"]) == {"e"}
    assert store.take_resync_request("e") is False
    assert member.beat() is False  # registered: nothing to do
    clock.now += 2.5
    assert store.reap("e", info, []) is True
    assert member.beat(rejoin=False) is False  # leaving: stays out
    assert store.members() == {}
    assert member.beat() is True  # registered again, a new incarnation
    assert store.members()["e"]["kind"] == "engine"
    member.deregister()
    assert store.members() == {} and store.alive(["e"]) == set()


def test_a_dead_engine_is_reaped_like_a_store_node() -> None:
    clock = FakeClock()
    store = EmbeddedMetadataStore(clock=clock)
    node = Membership(store, "s", MemberKind.STORE, {"endpoint": "s:1"})
    engine = Membership(store, "e", MemberKind.ENGINE, {"endpoint": "e:1"})
    node.register()
    engine.register()
    store.publish(
        [
            encode_event(SourceCleared("s", 0)),
            encode_event(BlocksStored("s", 1, Tier.DRAM, (k(1),))),
            encode_event(SourceCleared("e", 0)),
            encode_event(BlocksStored("e", 1, Tier.HBM, (k(1), k(2)))),
        ]
    )
    view = ClusterView(store, clock=clock)
    sync(view)
    assert view.holders(k(1)) == [("e", Tier.HBM), ("s", Tier.DRAM)]
    assert (view.live_nodes(), view.live_engines()) == ({"s": "s:1"}, {"e": "e:1"})
    # The engine is killed: the store node keeps heartbeating, the engine does not.
    clock.now += 4.0
    node.beat()
    sync(view)
    assert view.holders(k(2)) == [("e", Tier.HBM)]  # not expired yet
    clock.now += 1.5
    sync(view)
    assert view.num_reaped == 1
    assert set(store.members()) == {"s"}
    assert view.holders(k(1)) == [("s", Tier.DRAM)]
    assert view.holders(k(2)) == []
    assert (view.live_nodes(), view.live_engines()) == ({"s": "s:1"}, {})
    assert stream(store)[-1] == SourceCleared("e", SOURCE_GONE_SEQ)
    # A view started now, replaying the stream from its start, never sees the engine's blocks.
    late = ClusterView(store, clock=clock, reap_dead=False)
    sync(late)
    assert late.sources() == ("s",)
    assert late.holders(k(2)) == []


def test_an_engine_reaped_while_alive_comes_back_with_its_snapshot() -> None:
    clock = FakeClock()
    store = EmbeddedMetadataStore(clock=clock)
    engine = Membership(store, "e", MemberKind.ENGINE, {"endpoint": "e:1"})
    engine.register()
    store.publish(
        [
            encode_event(SourceCleared("e", 0)),
            encode_event(BlocksStored("e", 1, Tier.HBM, (k(1), k(2)))),
        ]
    )
    view = ClusterView(store, clock=clock)
    sync(view)
    clock.now += 5.5  # its heartbeat stalled past the timeout
    sync(view)  # reaped
    assert (view.num_reaped, view.holders(k(1))) == (1, [])
    # Its next heartbeat registers it again; it restarts its stream: SourceCleared(n) then a
    # snapshot of the same seq (what HbmEventPublisher does). The view applies both before it
    # next reads the membership, i.e. while it still counts the engine as dead.
    assert engine.beat() is True
    snapshot = SourceSnapshot.of("e", 2, {Tier.HBM: [k(1), k(2)]})
    store.publish([encode_event(SourceCleared("e", 2)), encode_snapshot(snapshot)])
    view.poll_once(0.001)
    assert view.holders(k(2)) == [("e", Tier.HBM)]
    view.refresh_membership()
    assert view.live_engines() == {"e": "e:1"}
    assert view.holders(k(1)) == [("e", Tier.HBM)]
    store.publish([encode_event(BlocksStored("e", 3, Tier.HBM, (k(3),)))])
    sync(view)
    assert view.holders(k(3)) == [("e", Tier.HBM)]


def test_a_dead_engines_straggling_snapshot_does_not_resurrect_it() -> None:
    clock = FakeClock()
    store = EmbeddedMetadataStore(clock=clock)
    engine = Membership(store, "e", MemberKind.ENGINE, {})
    engine.register()
    store.publish([encode_event(SourceCleared("e", 0))])
    view = ClusterView(store, clock=clock)
    sync(view)
    clock.now += 5.5
    sync(view)  # reaped
    store.publish([encode_snapshot(SourceSnapshot.of("e", 0, {Tier.HBM: [k(1)]}))])
    sync(view)
    assert view.holders(k(1)) == []
    assert view.sources() == ()
