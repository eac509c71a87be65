"""The Redis metadata store with the cluster key, on a real Valkey: member records and stream
messages are sealed (docs/design/security.md §5.2); forged ones are skipped, logged once, counted,
and the good ones still load, in order."""

from __future__ import annotations

import json
import logging

import pytest
import redis

from kvstore.metadata import START, RedisMetadataStore, open_metadata_store
from strata_common.credentials import Identity
from strata_common.grpc_auth import ClientAuth
from strata_common.records import RecordSeal
from tests.integration.kvstore.valkey_fixture import valkey_url
from tests.unit.kvstore.fakes import FakeClock
from tests.unit.kvstore.test_kvstore_metadata import exercise, exercise_reap

__all__ = ["valkey_url"]

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
WRONG = "wrong MAC (another cluster key, altered, or moved from another key or id)"
NO_MAC = "no MAC (written without the cluster key?)"


def test_with_keys_on_both_sides_everything_works_as_before(valkey_url: str) -> None:
    store = RedisMetadataStore(valkey_url, prefix="m1", cluster_key=KEY)
    raw = redis.Redis.from_url(valkey_url)
    try:
        exercise(store)
        exercise_reap(store)  # the reap names the sealed registration exactly
        assert store.messages_skipped == 0
        stored = raw.hget("m1:members", "b")
        body = json.dumps({"endpoint": "127.0.0.1:2"}).encode()
        assert stored == RecordSeal(KEY).seal(("m1:members", "b"), body)
        (_id, fields), *_ = raw.xrange("m1:events", count=1)
        assert fields[b"m"] == RecordSeal(KEY).seal(("m1:events",), b"one")
    finally:
        raw.close()
        store.close()


def test_open_metadata_store_seals_with_the_callers_cluster_key(valkey_url: str) -> None:
    auth = ClientAuth(KEY, Identity("store", "n1"))
    writer = open_metadata_store(valkey_url, auth=auth)
    reader = RedisMetadataStore(valkey_url, cluster_key=KEY)
    try:
        writer.register("n1", {"endpoint": "127.0.0.1:7600"})
        writer.publish([b"event"])
        assert reader.members() == {"n1": {"endpoint": "127.0.0.1:7600"}}
        assert reader.read(START, 0.01)[1] == [b"event"]
    finally:
        writer.close()
        reader.close()


def test_forged_member_records_are_skipped_and_logged_once(
    valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisMetadataStore(valkey_url, prefix="m2", cluster_key=KEY)
    raw = redis.Redis.from_url(valkey_url)
    fake = json.dumps({"endpoint": "10.6.6.6:7600"}).encode()
    seal, other = RecordSeal(KEY), RecordSeal(OTHER_KEY)
    try:
        store.register("good", {"endpoint": "127.0.0.1:7600"})
        good_sealed = raw.hget("m2:members", "good")
        forged = {
            "no-mac": fake,
            "other-key": other.seal(("m2:members", "other-key"), fake),
            "copied": good_sealed,  # a valid registration under another member id
            "other-prefix": seal.seal(("m3:members", "other-prefix"), fake),
            "tampered": seal.seal(("m2:members", "tampered"), fake).replace(b"6.6", b"6.7"),
        }
        raw.hset("m2:members", mapping=forged)
        with caplog.at_level(logging.WARNING, logger="kvstore.metadata.redis"):
            for _ in range(3):
                assert store.members() == {"good": {"endpoint": "127.0.0.1:7600"}}
        lines = sorted(r.getMessage() for r in caplog.records)
        assert lines == [
            f"skipping the member record under b'copied': {WRONG}",
            f"skipping the member record under b'no-mac': {NO_MAC}",
            f"skipping the member record under b'other-key': {WRONG}",
            f"skipping the member record under b'other-prefix': {WRONG}",
            f"skipping the member record under b'tampered': {WRONG}",
        ]
        # a forged registration cannot be reaped in a sealed store's name either: the reap
        # compares the exact sealed bytes it would have written
        assert store.reap("no-mac", json.loads(fake), [b"bye"]) is False
    finally:
        raw.close()
        store.close()


def test_forged_stream_messages_are_skipped_counted_and_rate_logged(
    valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    store = RedisMetadataStore(valkey_url, prefix="m4", cluster_key=KEY, log_clock=clock)
    raw = redis.Redis.from_url(valkey_url)
    try:
        store.publish([b"first"])
        raw.xadd("m4:events", {b"m": b"forged, no MAC"})
        raw.xadd("m4:events", {b"m": RecordSeal(OTHER_KEY).seal(("m4:events",), b"x")})
        raw.xadd("m4:events", {b"m": RecordSeal(KEY).seal(("m5:events",), b"moved")})
        raw.xadd("m4:events", {b"m": b"again, no MAC"})
        store.publish([b"second", b"third"])
        with caplog.at_level(logging.WARNING, logger="kvstore.metadata.redis"):
            cursor, got = store.read(START, 0.01)
            assert got == [b"first", b"second", b"third"]
            assert store.messages_skipped == 4
            assert store.read(cursor, 0.01) == (cursor, [])  # the cursor moved past them
            clock.now += 61.0
            raw.xadd("m4:events", {b"m": b"later, no MAC"})
            assert store.read(cursor, 0.01)[1] == []
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 3, lines  # one per reason, then one a minute later
        assert lines[0].endswith(f"of m4:events: {NO_MAC}")
        assert lines[1].endswith(f"of m4:events: {WRONG}")
        assert lines[2].endswith(
            f"of m4:events: {NO_MAC} (1 more like this since the previous line, not logged)"
        )
        assert store.messages_skipped == 5
    finally:
        raw.close()
        store.close()


def test_a_reader_without_the_key_skips_sealed_members(
    valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    sealed = RedisMetadataStore(valkey_url, prefix="m6", cluster_key=KEY)
    plain = RedisMetadataStore(valkey_url, prefix="m6")
    try:
        sealed.register("n1", {"endpoint": "127.0.0.1:7600"})
        sealed.publish([b"event"])
        with caplog.at_level(logging.WARNING, logger="kvstore.metadata.redis"):
            assert plain.members() == {}
            assert plain.read(START, 0.01)[1] == []
        assert plain.messages_skipped == 1
        assert "this process has none (--cluster-key-file)" in caplog.records[0].getMessage()
    finally:
        sealed.close()
        plain.close()
