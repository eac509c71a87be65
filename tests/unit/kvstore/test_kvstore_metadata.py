"""MetadataStore: the embedded store fully, the Redis store against a real Valkey server."""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest

from kvstore.metadata import (
    START,
    EmbeddedMetadataStore,
    MetadataStore,
    RedisMetadataStore,
    open_metadata_store,
)
from kvstore.metadata.base import member_info
from tests.integration.kvstore.valkey_fixture import valkey_url

__all__ = ["valkey_url"]
from tests.fakes import FakeClock


def exercise(store: MetadataStore) -> None:
    store.register("a", {"endpoint": "127.0.0.1:1"})
    store.register("b", {"endpoint": "127.0.0.1:2"})
    assert store.members()["a"] == {"endpoint": "127.0.0.1:1"}
    assert store.alive(["a", "b"]) == set()
    store.heartbeat("a", 5.0)
    assert store.alive(["a", "b"]) == {"a"}
    store.deregister("a")
    assert set(store.members()) == {"b"} and store.alive(["a"]) == set()
    # resync requests are taken once
    assert not store.take_resync_request("b")
    store.request_resync("b")
    assert store.take_resync_request("b") and not store.take_resync_request("b")
    # the stream: in order, cursor-based, blocking with a timeout
    cursor, got = store.read(START, 0.01)
    assert got == []
    store.publish([b"one", b"two"])
    store.publish([b"three"])
    cursor, got = store.read(cursor, 0.01)
    assert got == [b"one", b"two", b"three"]
    cursor2, got = store.read(cursor, 0.01)
    assert got == [] and cursor2 == cursor
    # a blocked reader wakes up on publish
    threading.Timer(0.05, store.publish, ([b"four"],)).start()
    t0 = time.monotonic()
    cursor, got = store.read(cursor, 2.0)
    assert got == [b"four"] and time.monotonic() - t0 < 1.5
    _, got = store.read(START, 0.01, count=2)
    assert got == [b"one", b"two"]


def exercise_reap(store: MetadataStore) -> None:
    """reap: only the incarnation the sweeper saw, only without a heartbeat, exactly once."""
    cursor, _ = store.read(START, 0.01, count=100_000)
    assert store.heartbeat("r", 30.0) is False  # not registered (yet)
    store.register("r", {"endpoint": "e:1", "started_at": 1.5})
    assert store.heartbeat("r", 30.0) is True
    seen = store.members()["r"]
    assert store.reap("r", seen, [b"gone-r"]) is False  # alive: refused
    store.register("d", {"endpoint": "e:2", "started_at": 1.0})  # never heartbeats: dead
    stale = store.members()["d"]
    store.register("d", {"endpoint": "e:2", "started_at": 2.0})  # restarted meanwhile
    assert store.reap("d", stale, [b"gone-d"]) is False  # another incarnation: refused
    current = store.members()["d"]
    store.request_resync("d")
    assert store.reap("d", current, [b"gone-d", b"bye"]) is True
    assert store.reap("d", current, [b"gone-d"]) is False  # idempotent: already gone
    assert "d" not in store.members() and "r" in store.members()
    assert not store.take_resync_request("d")
    _, got = store.read(cursor, 0.01)
    assert got == [b"gone-d", b"bye"]


def test_embedded_store_semantics() -> None:
    exercise(EmbeddedMetadataStore())
    exercise_reap(EmbeddedMetadataStore())


def test_embedded_heartbeat_expires_by_clock() -> None:
    clock = FakeClock(100.0)
    store = EmbeddedMetadataStore(clock=clock)
    store.register("n", {"endpoint": "x:1"})
    store.heartbeat("n", 5.0)
    clock.now += 4.9
    assert store.alive(["n"]) == {"n"}
    clock.now += 0.2
    assert store.alive(["n"]) == set()
    assert "n" in store.members()  # registration stays until the node comes back or leaves


def test_embedded_stream_trims_oldest() -> None:
    store = EmbeddedMetadataStore(maxlen=3)
    store.publish([bytes([i]) for i in range(5)])
    cursor, got = store.read(START, 0.01)
    assert got == [b"\x02", b"\x03", b"\x04"] and cursor == "5"


def test_embedded_stream_drops_what_is_older_than_its_age() -> None:
    clock = FakeClock(100.0)
    store = EmbeddedMetadataStore(clock=clock, max_age_s=60.0)
    store.publish([b"a", b"b"])
    clock.now += 30.0
    store.publish([b"c"])
    clock.now += 30.0  # a and b are 60 s old: still kept (older than the age goes)
    store.publish([b"d"])
    assert store.read(START, 0.01) == ("4", [b"a", b"b", b"c", b"d"])
    clock.now += 0.5
    store.publish([b"e"])  # trims on append: a and b are past the age
    assert store.read(START, 0.01) == ("5", [b"c", b"d", b"e"])
    assert store.read("1", 0.01) == ("5", [b"c", b"d", b"e"])  # a reader behind skips ahead
    clock.now += 1000.0  # nothing appended: nothing trimmed
    assert store.read("4", 0.01) == ("5", [b"e"])
    with pytest.raises(ValueError, match="max_age_s"):
        EmbeddedMetadataStore(max_age_s=0.0)


def test_open_metadata_store() -> None:
    assert open_metadata_store("embedded") is open_metadata_store("embedded")
    with pytest.raises(ValueError):
        open_metadata_store("zookeeper://x")


def test_redis_store_semantics(valkey_url: str) -> None:
    store = RedisMetadataStore(valkey_url, prefix="t1")
    try:
        assert store.ping()
        exercise(store)
        exercise_reap(store)
        store.heartbeat("n", 0.2)
        assert store.alive(["n"]) == {"n"}
        time.sleep(0.35)
        assert store.alive(["n"]) == set()
    finally:
        store.close()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff{", "not JSON"),
        (b"[1, 2]", "a list, not an object"),
        (b'"text"', "a str, not an object"),
        (b'{"endpoint": 7600}', "'endpoint' is not a string"),
        (b'{"kind": ["engine"]}', "'kind' is a list, not a scalar"),
        (b'{"nested": {"a": 1}}', "'nested' is a dict, not a scalar"),
        (b"{" + b",".join(b'"f%d": 1' % i for i in range(65)) + b"}", "65 fields"),
        (b'{"pad": "' + b"x" * 5000 + b'"}', "at most 4096"),
        (b"[" * 3000, "not JSON"),  # nesting past Python's recursion limit: a skip, not fatal
    ],
)
def test_member_info_is_validated(raw: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        member_info(raw)


def test_member_info_keeps_scalars() -> None:
    raw = b'{"endpoint": "h:1", "kind": "engine", "n": 3, "x": 0.5, "ok": true, "none": null}'
    assert member_info(raw) == {
        "endpoint": "h:1",
        "kind": "engine",
        "n": 3,
        "x": 0.5,
        "ok": True,
        "none": None,
    }


def test_redis_members_skip_bad_records_and_log_each_once(
    valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One member record that is not a JSON object used to stop every membership refresh."""
    import redis

    store = RedisMetadataStore(valkey_url, prefix="t-bad")
    raw = redis.Redis.from_url(valkey_url)
    try:
        store.register("good", {"endpoint": "127.0.0.1:7600"})
        raw.hset("t-bad:members", mapping={"bad-json": b"{", "a-list": b"[]", b"\xff": b"{}"})
        with caplog.at_level(logging.WARNING, logger="kvstore.metadata.redis"):
            for _ in range(3):
                assert store.members() == {"good": {"endpoint": "127.0.0.1:7600"}}
        skipped = [r for r in caplog.records if "skipping the member record" in r.getMessage()]
        assert len(skipped) == 3  # once each, not once per read
    finally:
        raw.close()
        store.close()
