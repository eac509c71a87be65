"""HbmEventPublisher against the real pieces, without an engine: vLLM's own ZmqEventPublisher (the
object the engine's scheduler publishes through), a Valkey server as the metadata store, and a
ClusterView reading the stream into a PrefixIndex."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch, ZmqEventPublisher

from dataplane.hbm_events import HbmBlockTranslator, HbmEventPublisher
from kvstore.blocks.hashing import block_keys, root_key
from kvstore.blocks.tier import Tier
from kvstore.cluster.events import SOURCE_GONE_SEQ, SourceCleared, decode_event, encode_event
from kvstore.cluster.view import ClusterView
from kvstore.metadata import START, RedisMetadataStore
from kvstore.metadata.remote import RemoteMetadataStore
from strata_common.credentials import Identity, load_or_create_cluster_key
from strata_common.grpc_auth import ClientAuth
from tests.integration.kvstore.node_process import NodeFactory, start_node
from tests.integration.kvstore.valkey_fixture import valkey_binary

__all__ = ["start_node"]  # the fixture

SOURCE = "127.0.0.1:7101"
BS = 4
TOKENS = list(range(500, 532))
ROOT = root_key(bytes(16), "test-layout", "")
KEYS = block_keys(TOKENS, BS, ROOT)


def vh(i: int) -> bytes:
    return i.to_bytes(32, "big")


def stored(first: int, last: int) -> BlockStored:
    """Blocks first..last-1 of TOKENS, chained on block first-1."""
    return BlockStored(
        block_hashes=[vh(i) for i in range(first, last)],
        parent_block_hash=vh(first - 1) if first else None,
        token_ids=TOKENS[first * BS : last * BS],
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )


def batch(*events: BlockStored | BlockRemoved) -> KVEventBatch:
    return KVEventBatch(ts=time.time(), events=list(events))


class Valkey:
    """A Valkey server that a test can stop and start again on the same port."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [str(valkey_binary()), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[Valkey]:
    server = Valkey(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def engine_publisher(tmp_path: Path) -> Iterator[ZmqEventPublisher]:
    """vLLM's publisher, as the engine core builds it from KVEventsConfig."""
    pub = ZmqEventPublisher(
        0, endpoint=f"ipc://{tmp_path}/kv-events", replay_endpoint=f"ipc://{tmp_path}/kv-replay"
    )
    yield pub
    pub.shutdown()


def make_publisher(url: str, tmp_path: Path, **kwargs: Any) -> HbmEventPublisher:
    return HbmEventPublisher(
        RedisMetadataStore(url),
        HbmBlockTranslator(
            SOURCE, BS, lambda namespace: root_key(bytes(16), "test-layout", namespace)
        ),
        f"ipc://{tmp_path}/kv-events",
        f"ipc://{tmp_path}/kv-replay",
        **kwargs,
    )


def hbm_keys(view: ClusterView) -> list[bytes]:
    """Keys of KEYS that the view says SOURCE holds in HBM, in chain order."""
    return [k for k in KEYS if (SOURCE, Tier.HBM) in view.holders(k)]


def stream(url: str) -> list[object]:
    store = RedisMetadataStore(url)
    try:
        _cursor, messages = store.read(START, 0.01, count=10_000)
    finally:
        store.close()
    return [decode_event(m) if m[1] != 4 else "snapshot" for m in messages]


def publish_until(
    pub: ZmqEventPublisher, hbm: HbmEventPublisher, event_batch: KVEventBatch, timeout_s: float = 10
) -> None:
    """Publish one engine batch and wait until the HBM publisher has translated it."""
    before = hbm.num_engine_batches
    pub.publish(event_batch)
    deadline = time.monotonic() + timeout_s
    while hbm.num_engine_batches == before:
        assert time.monotonic() < deadline, "the HBM publisher never saw the batch"
        time.sleep(0.01)


def test_engine_events_reach_the_index_and_leave_it_on_stop(
    valkey: Valkey, engine_publisher: ZmqEventPublisher, tmp_path: Path
) -> None:
    hbm = make_publisher(valkey.url, tmp_path).start()
    view = ClusterView(RedisMetadataStore(valkey.url), poll_interval_s=0.02).start()
    try:
        publish_until(engine_publisher, hbm, batch(stored(0, 3)))
        assert view.wait_for(lambda v: hbm_keys(v) == KEYS[:3])
        publish_until(engine_publisher, hbm, batch(stored(3, 5), BlockRemoved([vh(4)], "GPU")))
        assert view.wait_for(lambda v: hbm_keys(v) == KEYS[:4])
        hbm.stop()
        assert view.wait_for(lambda v: hbm_keys(v) == [])
    finally:
        hbm.close()
        view.stop()
    events = stream(valkey.url)
    assert [type(e).__name__ for e in events] == [
        "SourceCleared",
        "BlocksStored",
        "BlocksStored",
        "BlocksRemoved",
        "SourceCleared",
    ]
    assert [e.seq for e in events] == [0, 1, 2, 3, SOURCE_GONE_SEQ]  # type: ignore[attr-defined]


def test_a_reader_that_missed_events_gets_a_snapshot(
    valkey: Valkey, engine_publisher: ZmqEventPublisher, tmp_path: Path
) -> None:
    hbm = make_publisher(valkey.url, tmp_path, resync_poll_s=0.05).start()
    store = RedisMetadataStore(valkey.url)
    try:
        publish_until(engine_publisher, hbm, batch(stored(0, 2)))
        assert view_free_wait(lambda: len(stream(valkey.url)) == 2)
        store._redis.delete("strata:kv:events")  # trimmed away before this reader started
        view = ClusterView(store, poll_interval_s=0.02).start()
        try:
            # The next event shows the reader a gap; it asks for a snapshot, the worker answers.
            publish_until(engine_publisher, hbm, batch(stored(2, 3)))
            assert view.wait_for(lambda v: hbm_keys(v) == KEYS[:3])
        finally:
            view.stop()
        names = [e if isinstance(e, str) else type(e).__name__ for e in stream(valkey.url)]
        assert names == ["BlocksStored", "snapshot"]
    finally:
        hbm.close()
        store.close()


def view_free_wait(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_late_subscriber_replays_what_it_missed(
    valkey: Valkey, engine_publisher: ZmqEventPublisher, tmp_path: Path
) -> None:
    # The engine published before the worker subscribed (zmq's slow joiner).
    engine_publisher.publish(batch(stored(0, 2)))
    engine_publisher.publish(batch(stored(2, 3)))
    time.sleep(0.3)
    hbm = make_publisher(valkey.url, tmp_path).start()
    view = ClusterView(RedisMetadataStore(valkey.url), poll_interval_s=0.02).start()
    try:
        time.sleep(0.3)  # let the subscription connect
        publish_until(engine_publisher, hbm, batch(stored(3, 4)), timeout_s=10)
        assert view.wait_for(lambda v: hbm_keys(v) == KEYS[:4])
        assert hbm.num_engine_batches == 3  # two of them replayed
    finally:
        hbm.close()
        view.stop()


def test_an_unreachable_store_drops_events_then_restarts_the_stream(
    valkey: Valkey, engine_publisher: ZmqEventPublisher, tmp_path: Path
) -> None:
    hbm = make_publisher(valkey.url, tmp_path, retry_s=0.1).start()
    try:
        publish_until(engine_publisher, hbm, batch(stored(0, 2)))
        valkey.stop()
        publish_until(engine_publisher, hbm, batch(stored(2, 4), BlockRemoved([vh(3)], "GPU")))
        deadline = time.monotonic() + 20
        while hbm.num_dropped == 0:
            assert time.monotonic() < deadline, "the publisher never noticed the store was gone"
            time.sleep(0.02)
        valkey.start()  # empty: the old stream is gone too
        view = ClusterView(RedisMetadataStore(valkey.url), poll_interval_s=0.02).start()
        try:
            assert view.wait_for(lambda v: hbm_keys(v) == KEYS[:3], timeout_s=20)
        finally:
            view.stop()
        names = [e if isinstance(e, str) else type(e).__name__ for e in stream(valkey.url)]
        assert names[:2] == ["SourceCleared", "snapshot"]
    finally:
        hbm.close()


def test_the_worker_is_an_engine_member_until_it_stops(
    valkey: Valkey, engine_publisher: ZmqEventPublisher, tmp_path: Path
) -> None:
    hbm = make_publisher(
        valkey.url,
        tmp_path,
        info={"endpoint": SOURCE},
        heartbeat_interval_s=0.1,
        heartbeat_timeout_s=1.0,
    )
    store = RedisMetadataStore(valkey.url)
    view = ClusterView(store, poll_interval_s=0.02).start()
    try:
        hbm.start()
        info = store.members()[SOURCE]
        assert (info["kind"], info["endpoint"]) == ("engine", SOURCE)
        assert store.alive([SOURCE]) == {SOURCE}
        assert view.wait_for(lambda v: v.live_engines() == {SOURCE: SOURCE})
        assert view.live_nodes() == {}  # an engine is never a store peer
        time.sleep(1.5)  # past the heartbeat timeout: the heartbeat thread keeps it alive
        assert store.alive([SOURCE]) == {SOURCE}
        assert view.num_reaped == 0
        hbm.stop()
        assert store.members() == {}
        assert view.wait_for(lambda v: v.live_engines() == {})
        assert view.num_reaped == 0  # it left, nobody reaped it
    finally:
        hbm.close()
        view.stop()
        store.close()


def test_a_worker_reaped_while_alive_registers_again_and_republishes(
    valkey: Valkey, engine_publisher: ZmqEventPublisher, tmp_path: Path
) -> None:
    hbm = make_publisher(valkey.url, tmp_path, heartbeat_interval_s=0.1).start()
    store = RedisMetadataStore(valkey.url)
    view = ClusterView(store, poll_interval_s=0.02).start()
    try:
        publish_until(engine_publisher, hbm, batch(stored(0, 3)))
        assert view.wait_for(lambda v: hbm_keys(v) == KEYS[:3])
        # What a sweep does to a member whose heartbeat expired (its heartbeat thread stalled):
        # heartbeat, registration and resync flag gone, SourceCleared(GONE) appended -- at once.
        client = store._redis
        pipe = client.pipeline(transaction=True)
        pipe.delete(f"strata:kv:hb:{SOURCE}")
        pipe.hdel("strata:kv:members", SOURCE)
        gone = encode_event(SourceCleared(SOURCE, SOURCE_GONE_SEQ))
        pipe.xadd("strata:kv:events", {b"m": gone})
        pipe.execute()
        deadline = time.monotonic() + 10
        while hbm.num_rejoins == 0:
            assert time.monotonic() < deadline, "the worker never noticed it was reaped"
            time.sleep(0.02)
        assert view.wait_for(lambda v: hbm_keys(v) == KEYS[:3] and SOURCE in v.live_engines())
        assert store.members()[SOURCE]["kind"] == "engine"
        names = [e if isinstance(e, str) else type(e).__name__ for e in stream(valkey.url)]
        assert names == [
            "SourceCleared",  # seq 0
            "BlocksStored",
            "SourceCleared",  # the sweep's GONE
            "SourceCleared",  # the new stream: seq 2
            "snapshot",
        ]
        publish_until(engine_publisher, hbm, batch(stored(3, 4)))
        assert view.wait_for(lambda v: hbm_keys(v) == KEYS[:4])
    finally:
        hbm.close()
        view.stop()
        store.close()


def _secret_node(start_node: NodeFactory, key_file: Path) -> Any:
    return start_node(
        "--metadata", "embedded", "--node-id", "N", "--prefault", "false",
        "--heartbeat-interval", "0.2s", "--cluster-key-file", str(key_file),
    )  # fmt: skip


@pytest.mark.parametrize("identity", [SOURCE, "127.0.0.1:7999"])
def test_with_a_cluster_key_a_worker_publishes_only_under_its_own_source_id(
    identity: str, start_node: NodeFactory, engine_publisher: ZmqEventPublisher, tmp_path: Path
) -> None:
    """Secret mode (docs/design/security.md §5.1): the publisher speaks to the store node's
    metadata service as worker/IDENTITY; its events (source SOURCE) get in only when the two
    agree -- as dataplane/worker.py makes them -- else every call is refused and nothing of
    SOURCE reaches the gateway's index."""
    key_file = tmp_path / "cluster.key"
    key, _ = load_or_create_cluster_key(key_file)
    node = _secret_node(start_node, key_file)
    endpoint = node.metadata.removeprefix("strata://")
    hbm = HbmEventPublisher(
        RemoteMetadataStore(endpoint, auth=ClientAuth(key, Identity("worker", identity))),
        HbmBlockTranslator(
            SOURCE, BS, lambda namespace: root_key(bytes(16), "test-layout", namespace)
        ),
        f"ipc://{tmp_path}/kv-events",
        f"ipc://{tmp_path}/kv-replay",
        retry_s=0.05,
    ).start()
    gateway = RemoteMetadataStore(endpoint, auth=ClientAuth(key, Identity("gateway", "g")))
    view = ClusterView(gateway, poll_interval_s=0.02).start()
    try:
        publish_until(engine_publisher, hbm, batch(stored(0, 3)))
        if identity == SOURCE:
            assert view.wait_for(lambda v: hbm_keys(v) == KEYS[:3])
            assert set(view.live_engines()) == {SOURCE}
            assert hbm.num_dropped == 0
        else:
            assert view_free_wait(lambda: hbm.num_dropped >= 2)  # SourceCleared, BlocksStored
            assert SOURCE not in gateway.members() and SOURCE not in view.sources()
            assert hbm_keys(view) == []
    finally:
        hbm.close()
        view.stop()
        gateway.close()
    refused = "refused a call (PERMISSION_DENIED): worker/127.0.0.1:7999 may not call"
    assert (refused in node.log()) is (identity != SOURCE)
