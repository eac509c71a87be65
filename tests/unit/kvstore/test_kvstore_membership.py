"""ClusterView over an embedded metadata store: events, gaps, resync, expiry by a fake clock."""

from __future__ import annotations

from kvstore.blocks.tier import Tier
from kvstore.cluster.events import (
    SOURCE_GONE_SEQ,
    BlocksRemoved,
    BlocksStored,
    SourceCleared,
    SourceSnapshot,
    decode_event,
    encode_event,
    encode_snapshot,
)
from kvstore.cluster.view import ClusterView
from kvstore.metadata import START, EmbeddedMetadataStore
from tests.fakes import FakeClock
from tests.unit.kvstore.fakes import k


def join(store: EmbeddedMetadataStore, node: str, ttl: float = 5.0) -> None:
    store.register(node, {"endpoint": f"{node}:1"})
    store.heartbeat(node, ttl)


def sync(view: ClusterView) -> None:
    view.poll_once(0.001)
    view.refresh_membership()


def test_events_membership_and_crash_expiry() -> None:
    clock = FakeClock()
    store = EmbeddedMetadataStore(clock=clock)
    join(store, "a")
    join(store, "b")
    store.publish(
        [
            encode_event(SourceCleared("a", 0)),
            encode_event(BlocksStored("a", 1, Tier.DRAM, (k(1), k(2)))),
            encode_event(SourceCleared("b", 0)),
            encode_event(BlocksStored("b", 1, Tier.SSD, (k(1),))),
        ]
    )
    view = ClusterView(store, clock=clock)
    sync(view)
    assert view.live_nodes() == {"a": "a:1", "b": "b:1"}
    assert view.match([k(1), k(2), k(3)]).depth == 2
    assert view.holders(k(1)) == [("a", Tier.DRAM), ("b", Tier.SSD)]
    store.publish([encode_event(BlocksRemoved("a", 2, Tier.DRAM, (k(2),)))])
    sync(view)
    assert view.match([k(1), k(2)]).depth == 1
    # b keeps heartbeating, a stops (kill -9): a leaves once its heartbeat expires
    clock.now += 4.0
    store.heartbeat("b", 5.0)
    sync(view)
    assert "a" in view.live_nodes()
    clock.now += 1.5
    sync(view)
    assert view.live_nodes() == {"b": "b:1"}
    assert view.holders(k(1)) == [("b", Tier.SSD)]
    assert view.sources() == ("b",)
    # a dead member's straggling events do not resurrect it
    store.publish([encode_event(BlocksStored("a", 3, Tier.DRAM, (k(9),)))])
    sync(view)
    assert view.holders(k(9)) == []
    # a restart (new heartbeat, SourceCleared 0) brings it back
    join(store, "a")
    store.publish(
        [
            encode_event(SourceCleared("a", 0)),
            encode_event(BlocksStored("a", 1, Tier.SSD, (k(5),))),
        ]
    )
    sync(view)
    assert view.holders(k(5)) == [("a", Tier.SSD)]


def test_gap_requests_snapshot_and_snapshot_resyncs() -> None:
    clock = FakeClock()
    store = EmbeddedMetadataStore(clock=clock)
    join(store, "a")
    store.publish(
        [
            encode_event(SourceCleared("a", 0)),
            encode_event(BlocksStored("a", 1, Tier.DRAM, (k(1),))),
            encode_event(BlocksStored("a", 3, Tier.DRAM, (k(3),))),  # seq 2 was lost
        ]
    )
    view = ClusterView(store, clock=clock)
    sync(view)
    assert store.take_resync_request("a")
    assert not store.take_resync_request("a")
    clock.now += 1.1  # still owed: asked again
    sync(view)
    assert store.take_resync_request("a")
    snapshot = SourceSnapshot.of("a", 3, {Tier.DRAM: [k(1), k(2), k(3)]})
    store.publish([encode_snapshot(snapshot)])
    sync(view)
    assert view.match([k(1), k(2), k(3)]).depth == 3
    clock.now += 1.1
    sync(view)
    assert not store.take_resync_request("a")  # nothing owed any more


def test_graceful_leave_removes_source() -> None:
    store = EmbeddedMetadataStore()
    join(store, "a")
    store.publish(
        [
            encode_event(SourceCleared("a", 0)),
            encode_event(BlocksStored("a", 1, Tier.DRAM, (k(1),))),
        ]
    )
    view = ClusterView(store)
    sync(view)
    assert view.num_blocks() == 1
    store.publish([encode_event(SourceCleared("a", 2))])
    store.deregister("a")
    sync(view)
    assert view.num_blocks() == 0 and view.sources() == () and view.live_nodes() == {}


def test_background_thread_follows() -> None:
    store = EmbeddedMetadataStore()
    join(store, "a")
    with ClusterView(store, poll_interval_s=0.02) as view:
        store.publish(
            [
                encode_event(SourceCleared("a", 0)),
                encode_event(BlocksStored("a", 1, Tier.DRAM, (k(7),))),
            ]
        )
        assert view.wait_for(lambda v: v.holders(k(7)) == [("a", Tier.DRAM)], 5.0)


def test_dead_member_is_reaped_once_and_a_later_view_never_sees_it() -> None:
    clock = FakeClock()
    store = EmbeddedMetadataStore(clock=clock)
    join(store, "a")
    join(store, "b", ttl=60.0)
    store.publish(
        [
            encode_event(SourceCleared("a", 0)),
            encode_event(BlocksStored("a", 1, Tier.DRAM, (k(1),))),
            encode_event(SourceCleared("b", 0)),
            encode_event(BlocksStored("b", 1, Tier.DRAM, (k(2),))),
        ]
    )
    first, second = ClusterView(store, clock=clock), ClusterView(store, clock=clock)
    sync(first)
    sync(second)
    assert first.holders(k(1)) == [("a", Tier.DRAM)]
    clock.now += 5.5  # a crashed: its heartbeat expires
    sync(first)
    sync(second)
    assert (first.num_reaped, second.num_reaped) == (1, 0)  # whoever noticed first
    assert set(store.members()) == {"b"}
    _, messages = store.read(START, 0.0)
    assert decode_event(messages[-1]) == SourceCleared("a", SOURCE_GONE_SEQ)
    for view in (first, second):
        sync(view)
        assert view.sources() == ("b",) and view.holders(k(1)) == []
    # A view started later, replaying the stream from its start, never sees a.
    late = ClusterView(store, clock=clock)
    sync(late)
    assert late.sources() == ("b",)
    assert late.match([k(1)]).depth == 0 and late.holders(k(2)) == [("b", Tier.DRAM)]


def test_a_stale_sweep_cannot_reap_a_restarted_node() -> None:
    clock = FakeClock()
    store = EmbeddedMetadataStore(clock=clock)
    join(store, "a")
    clock.now += 6.0  # a died ...
    stale_members = store.members()  # ... and a sweeper reads the members now
    assert store.alive(stale_members) == set()
    # ... but a restarts (heartbeat first, then a new registration) before the sweep acts
    store.heartbeat("a", 5.0)
    store.register("a", {"endpoint": "a:2"})
    assert not store.reap("a", stale_members["a"], [b"x"])
    # even once the new incarnation dies, the stale sweep's view of a is not the current one
    clock.now += 6.0
    assert not store.reap("a", stale_members["a"], [b"x"])
    assert store.members() == {"a": {"endpoint": "a:2"}}
    view = ClusterView(store, clock=clock)
    sync(view)  # a fresh sweep reaps the current (dead) incarnation
    assert view.num_reaped == 1 and store.members() == {}
    _, messages = store.read(START, 0.0)
    assert [decode_event(m) for m in messages] == [SourceCleared("a", SOURCE_GONE_SEQ)]


def test_reaping_can_be_turned_off() -> None:
    clock = FakeClock()
    store = EmbeddedMetadataStore(clock=clock)
    join(store, "a")
    clock.now += 6.0
    view = ClusterView(store, clock=clock, reap_dead=False)
    sync(view)
    assert view.num_reaped == 0 and set(store.members()) == {"a"} and view.live_nodes() == {}


def test_a_late_view_asks_a_quiet_source_whose_events_were_trimmed() -> None:
    clock = FakeClock()
    store = EmbeddedMetadataStore(clock=clock, max_age_s=60.0)
    join(store, "a", ttl=1e6)
    join(store, "b", ttl=1e6)
    store.publish(
        [
            encode_event(SourceCleared("a", 0)),
            encode_event(BlocksStored("a", 1, Tier.DRAM, (k(1),))),
            encode_event(SourceCleared("b", 0)),
        ]
    )
    clock.now += 120.0  # a stays quiet; b's next event trims a's off the stream
    store.publish([encode_event(BlocksStored("b", 1, Tier.DRAM, (k(2),)))])
    view = ClusterView(store, clock=clock)
    sync(view)  # b's event is a gap (its SourceCleared was trimmed too): b is owed at once
    assert view.holders(k(1)) == []
    assert store.take_resync_request("b") and not store.take_resync_request("a")
    clock.now += 4.9  # a member just joined would have published its first event by now ...
    sync(view)
    assert not store.take_resync_request("a")
    clock.now += 0.1  # ... a is quiet: asked for its state
    sync(view)
    assert store.take_resync_request("a")
    assert store.take_resync_request("b")  # still owed meanwhile: asked again every second
    store.publish(
        [
            encode_snapshot(SourceSnapshot.of("a", 1, {Tier.DRAM: [k(1)]})),
            encode_snapshot(SourceSnapshot.of("b", 1, {Tier.DRAM: [k(2)]})),
        ]
    )
    sync(view)
    assert view.holders(k(1)) == [("a", Tier.DRAM)] and view.holders(k(2)) == [("b", Tier.DRAM)]
    clock.now += 10.0
    sync(view)  # known now: asked once, never again
    assert not store.take_resync_request("a") and not store.take_resync_request("b")
