"""The Redis metadata store with the cluster key, on a real Valkey: member records and stream
messages are sealed (docs/design/security.md §5.2); forged ones are skipped, logged once, counted,
and the good ones still load, in order."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import pytest
import redis

from kvstore.blocks.tier import Tier
from kvstore.client.sync import KVStoreClient
from kvstore.cluster.events import SOURCE_GONE_SEQ, SourceCleared, decode_event
from kvstore.cluster.view import ClusterView
from kvstore.metadata import START, RedisMetadataStore, open_metadata_store
from kvstore.wire.types import PutStatus
from strata_common.credentials import ClusterCredentials, Identity, write_secret_file
from strata_common.grpc_auth import ClientAuth
from strata_common.records import RecordSeal
from tests.fakes import FakeClock
from tests.integration.kvstore.node_args import cluster_args
from tests.integration.kvstore.node_process import NodeFactory
from tests.integration.kvstore.valkey_fixture import valkey_url
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


def test_store_nodes_with_the_key_seal_skip_forgeries_and_reap(
    start_node: NodeFactory, valkey_url: str, tmp_path: Path
) -> None:
    """Real store nodes with --cluster-key-file over Redis: they see each other and read
    through, skip a forged member and a forged message (logged once), and reap a killed node
    with the sealed conditional reap; a reader without the key sees only the forged member."""
    key_file = tmp_path / "cluster.key"
    write_secret_file(key_file, KEY.hex() + "\n")
    sealed = ("--cluster-key-file", str(key_file), "--reconcile-interval", "1h")
    node_a = start_node(*cluster_args(valkey_url, "A", *sealed))
    node_b = start_node(*cluster_args(valkey_url, "B", *sealed))
    store = RedisMetadataStore(valkey_url, cluster_key=KEY)
    plain = RedisMetadataStore(valkey_url)
    raw = redis.Redis.from_url(valkey_url)
    worker = ClusterCredentials(KEY, Identity("worker", "w1"))
    block, data = (0x5EA1 << 112).to_bytes(16, "big"), b"sealed" * 1000
    try:
        raw.hset("strata:kv:members", "F", json.dumps({"endpoint": node_a.endpoint}))
        raw.xadd("strata:kv:events", {b"m": b"forged, no MAC"})
        with ClusterView(store, poll_interval_s=0.05) as view:
            assert view.wait_for(lambda v: set(v.live_nodes()) == {"A", "B"}, 10.0)
            with KVStoreClient(node_a.endpoint, use_shm=False, credentials=worker) as a:
                assert a.put(block, data) is PutStatus.OK
            assert view.wait_for(lambda v: v.holders(block) == [("A", Tier.DRAM)], 10.0)
            with KVStoreClient(node_b.endpoint, use_shm=False, credentials=worker) as b:
                assert b.get(block) == data  # read through A, found in the sealed stream
            assert "F" not in store.members() and store.messages_skipped >= 1
        assert set(plain.members()) == {"F"}  # without the key: only the unsealed forgery
        node_a.stop(signal.SIGKILL)
        deadline = time.monotonic() + 20.0  # B reaps A after its 1 s heartbeat timeout
        while "A" in store.members():
            assert time.monotonic() < deadline, "A was never reaped"
            time.sleep(0.05)
        _, messages = store.read(START, 0.01, count=100_000)
        events_of_a = [e for e in map(decode_event, messages) if e.source == "A"]
        assert events_of_a[-1] == SourceCleared("A", SOURCE_GONE_SEQ)
        skipped_member = node_b.log().count("skipping the member record under b'F'")
        assert skipped_member == 1, node_b.log()[-2000:]  # once, however many refreshes
    finally:
        raw.close()
        plain.close()
        store.close()
