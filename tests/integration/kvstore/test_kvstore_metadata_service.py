"""Node-served metadata (``strata://HOST:PORT``): one store node with embedded metadata, and the
other processes of the host -- here, the test -- following and publishing to its event stream."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from kvstore.blocks.tier import Tier
from kvstore.client.sync import KVStoreClient
from kvstore.cluster.view import ClusterView
from kvstore.events import BlocksStored, SourceCleared, decode_event, encode_event
from kvstore.metadata import START, open_metadata_store
from kvstore.metadata_service import (
    MetadataServiceError,
    RemoteMetadataStore,
    decode_call,
    encode_call,
)
from kvstore.wire.frame import FRAME_HEADER_BYTES, FrameHeader, Op, Status, pack_frame_header
from kvstore.wire.types import PutStatus

pytestmark = pytest.mark.timeout(90)

NodeFactory = Callable[..., Any]
KIB = 1024


def key(n: int) -> bytes:
    return (0x5100 << 112 | n).to_bytes(16, "big")


def payload(n: int) -> bytes:
    return bytes((i * 7 + n) % 256 for i in range(64 * KIB))


def embedded_node(start_node: NodeFactory) -> Any:
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
    )


def raw_call(sock: socket.socket, request_id: int, body: bytes) -> tuple[int, dict[str, Any]]:
    """Send one METADATA frame with ``body``; return (status, JSON of the reply)."""
    sock.sendall(pack_frame_header(Op.METADATA, request_id, 0, len(body)) + body)
    header = FrameHeader.decode(recv_exact(sock, FRAME_HEADER_BYTES))
    assert (header.opcode, header.request_id) == (Op.METADATA, request_id)
    reply, _blobs = decode_call(recv_exact(sock, header.payload_len))
    return header.status, reply


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the node closed the connection"
        data += chunk
    return data


def test_cluster_view_and_external_publisher_over_the_node(start_node: NodeFactory) -> None:
    node = embedded_node(start_node)
    spec = f"strata://{node.endpoint}"
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
    store = RemoteMetadataStore(node.endpoint)
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
        # While a read is parked on the node, other calls (other connections) are answered,
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


def test_malformed_metadata_requests_get_errors_and_the_node_keeps_serving(
    start_node: NodeFactory,
) -> None:
    node = embedded_node(start_node)
    host, port = node.endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        status, reply = raw_call(sock, 1, b"\x05\x00\x00\x00\x00\x00\x00\x00{not")
        assert status == Status.BAD_REQUEST and "metadata call" in reply["error"]
        status, reply = raw_call(sock, 2, b"garbage")
        assert status == Status.BAD_REQUEST
        status, reply = raw_call(sock, 3, encode_call({"method": "drop_everything"}))
        assert (status, reply) == (
            Status.BAD_REQUEST,
            {"error": "unknown metadata method 'drop_everything'"},
        )
        status, reply = raw_call(
            sock, 4, encode_call({"method": "heartbeat", "node_id": "", "ttl_s": 1})
        )
        assert status == Status.BAD_REQUEST and "node_id" in reply["error"]
        bad_read = {"method": "read", "cursor": "x", "block_s": 0, "count": 1}
        status, reply = raw_call(sock, 5, encode_call(bad_read))
        assert status == Status.BAD_REQUEST and "cursor" in reply["error"]
        # the same connection still works
        status, reply = raw_call(sock, 6, encode_call({"method": "members"}))
        assert status == Status.OK and set(reply["members"]) == {"N"}
    store = RemoteMetadataStore(node.endpoint)
    try:
        with pytest.raises(MetadataServiceError, match="ttl_s"):
            store.heartbeat("x", -1.0)
        assert "N" in store.members()  # the node keeps serving
    finally:
        store.close()
    with KVStoreClient(node.endpoint, use_shm=False) as client:
        assert client.put(key(1), payload(1)) is PutStatus.OK


def test_a_node_without_embedded_metadata_refuses(start_node: NodeFactory) -> None:
    node = start_node("--prefault", "false")
    store = RemoteMetadataStore(node.endpoint)
    try:
        with pytest.raises(MetadataServiceError, match="serves no metadata"):
            store.members()
    finally:
        store.close()
