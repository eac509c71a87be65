"""Node-served metadata (``strata://HOST:PORT``): one store node with embedded metadata serving it
over gRPC, and the other processes of the host -- here, the test -- following and publishing to
its event stream."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.blocks.tier import Tier
from kvstore.client.sync import KVStoreClient
from kvstore.cluster.events import BlocksStored, SourceCleared, decode_event, encode_event
from kvstore.cluster.view import ClusterView
from kvstore.metadata import START, open_metadata_store
from kvstore.metadata.remote import RemoteMetadataStore
from kvstore.wire.types import PutStatus

pytestmark = pytest.mark.timeout(90)

NodeFactory = Callable[..., Any]
KIB = 1024


def key(n: int) -> bytes:
    return (0x5100 << 112 | n).to_bytes(16, "big")


def payload(n: int) -> bytes:
    return bytes((i * 7 + n) % 256 for i in range(64 * KIB))


def embedded_node(start_node: NodeFactory, *args: str) -> Any:
    return start_node(
        "--metadata",
        "embedded",
        "--node-id",
        "N",
        "--heartbeat-interval",
        "0.2s",
        "--heartbeat-timeout",
        "2s",
        "--reconcile-interval",
        "1h",  # events come from the tiers' notifications, not from a periodic diff
        "--prefault",
        "false",
        *args,
    )


def test_cluster_view_and_external_publisher_over_the_node(start_node: NodeFactory) -> None:
    node = embedded_node(start_node)
    spec = node.metadata
    assert spec is not None and spec != f"strata://{node.endpoint}"  # its own gRPC port
    view_store = open_metadata_store(spec)
    engine = open_metadata_store(spec)
    assert isinstance(view_store, RemoteMetadataStore)
    view = ClusterView(view_store, poll_interval_s=0.05).start()
    try:
        assert view.wait_for(lambda v: v.live_nodes() == {"N": node.endpoint}, 5.0)
        keys = [key(n) for n in range(3)]
        with KVStoreClient(node.endpoint, use_shm=False) as client:
            assert (
                client.put_many([(k, payload(n)) for n, k in enumerate(keys)]) == [PutStatus.OK] * 3
            )
        assert view.wait_for(lambda v: all(v.holders(k) == [("N", Tier.DRAM)] for k in keys))

        # A worker publishes its HBM-resident blocks under its own instance id.
        engine.heartbeat("engine-a", 60.0)
        engine.register("engine-a", {"endpoint": "127.0.0.1:9", "role": "prefill"})
        engine.publish(
            [
                encode_event(SourceCleared("engine-a", 0)),
                encode_event(BlocksStored("engine-a", 1, Tier.HBM, tuple(keys[:2]))),
            ]
        )
        assert view.wait_for(
            lambda v: (
                v.holders(keys[0]) == [("engine-a", Tier.HBM), ("N", Tier.DRAM)]
                and v.holders(keys[1]) == [("engine-a", Tier.HBM), ("N", Tier.DRAM)]
                and v.holders(keys[2]) == [("N", Tier.DRAM)]
            )
        )
        assert view.match(keys).depth_by_tier[Tier.HBM] == 2
        engine.publish([encode_event(SourceCleared("engine-a", 2))])
        assert view.wait_for(lambda v: all(v.holders(k) == [("N", Tier.DRAM)] for k in keys))
        assert set(view.live_nodes()) == {"N", "engine-a"}
    finally:
        view.stop()
        view_store.close()
        engine.close()


def test_long_poll_parks_without_blocking_other_calls(start_node: NodeFactory) -> None:
    node = embedded_node(start_node)
    assert node.metadata is not None
    store = open_metadata_store(node.metadata)
    try:
        cursor, _ = store.read(START, 0.0, count=65536)
        got: list[bytes] = []

        def follow() -> None:  # long polls
            position = cursor
            while len(got) < 2:  # ours and the node's event for key 9, in either order
                position, messages = store.read(position, 25.0)
                got.extend(messages)

        reader = threading.Thread(target=follow)
        reader.start()
        # While a read is parked on the node, other calls (on the same channel) are answered,
        # and so are data-path requests.
        with KVStoreClient(node.endpoint, use_shm=False) as client:
            assert client.put(key(9), payload(9)) is PutStatus.OK
            assert client.get(key(9)) == payload(9)
        assert "N" in store.members()
        store.publish([b"wake-up"])
        reader.join(30.0)
        assert not reader.is_alive()
        assert len(got) == 2 and b"wake-up" in got
        got.remove(b"wake-up")
        assert decode_event(got[0]) == BlocksStored("N", 1, Tier.DRAM, (key(9),))
    finally:
        store.close()


def test_bad_arguments_get_value_errors_and_the_node_keeps_serving(
    start_node: NodeFactory,
) -> None:
    node = embedded_node(start_node)
    assert node.metadata is not None
    store = open_metadata_store(node.metadata)
    assert isinstance(store, RemoteMetadataStore)
    try:
        with pytest.raises(ValueError, match=r"ttl_s must be in \[0.001, 86400\]"):
            store.heartbeat("x", -1.0)
        with pytest.raises(ValueError, match=r"node_id must be a string of 1\.\.255 bytes"):
            store.heartbeat("", 1.0)
        with pytest.raises(ValueError, match="cursor must be a cursor returned by Read"):
            store.read("x", 0.0, 1)
        with pytest.raises(ValueError, match="count must be at least 1"):
            store.read(START, 0.0, 0)
        assert "N" in store.members()  # the node keeps serving
    finally:
        store.close()
    with KVStoreClient(node.endpoint, use_shm=False) as client:
        assert client.put(key(1), payload(1)) is PutStatus.OK


def test_health_says_serving_on_the_metadata_port(start_node: NodeFactory) -> None:
    node = embedded_node(start_node)
    assert node.metadata is not None
    with grpc.insecure_channel(node.metadata.removeprefix("strata://")) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "strata.metadata.v1.Metadata"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_metadata_port_is_configurable_and_only_embedded_metadata_is_served(
    start_node: NodeFactory,
) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = embedded_node(start_node, "--metadata-port", str(port))
    assert node.metadata == f"strata://127.0.0.1:{port}"
    store = open_metadata_store(node.metadata)
    try:
        assert set(store.members()) == {"N"}
    finally:
        store.close()
    assert start_node("--prefault", "false").metadata is None  # standalone: nothing to serve
