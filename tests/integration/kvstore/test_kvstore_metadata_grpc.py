"""The gRPC metadata service and its client, in this process: the same semantics as the embedded
store (members, heartbeats, reap, the stream in order), deadlines, the error mapping, health."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.metadata import START, EmbeddedMetadataStore, open_metadata_store
from kvstore.metadata import service as service_module
from kvstore.metadata.remote import RemoteMetadataStore
from kvstore.metadata.service import MetadataServer
from strata_proto import metadata_pb2, metadata_pb2_grpc
from tests.unit.kvstore.test_kvstore_metadata import exercise, exercise_reap

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")


@dataclass
class Served:
    """An embedded store behind a MetadataServer running on a loop of its own."""

    store: EmbeddedMetadataStore
    server: MetadataServer

    @property
    def spec(self) -> str:
        return self.server.spec


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own (the node's loop, here)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def on(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(10)


@pytest.fixture
def served(loop: asyncio.AbstractEventLoop) -> Iterator[Served]:
    store = EmbeddedMetadataStore()
    server = MetadataServer(store, "127.0.0.1", 0)
    on(loop, server.start())
    yield Served(store, server)
    on(loop, server.stop())


@pytest.fixture
def remote(served: Served) -> Iterator[RemoteMetadataStore]:
    store = open_metadata_store(served.spec)
    assert isinstance(store, RemoteMetadataStore)
    yield store
    store.close()


def test_the_remote_store_has_the_embedded_semantics(remote: RemoteMetadataStore) -> None:
    exercise(remote)


def test_reap_is_atomic_and_exact_over_the_wire(remote: RemoteMetadataStore) -> None:
    exercise_reap(remote)


def test_member_info_keeps_its_types(remote: RemoteMetadataStore, served: Served) -> None:
    info = {"endpoint": "h:1", "pid": 42, "started_at": 1.5, "ready": True, "gpu": None}
    remote.register("m", info)
    assert served.store.members()["m"] == info
    got = remote.members()["m"]
    assert got == info and type(got["pid"]) is int and type(got["started_at"]) is float
    with pytest.raises(ValueError, match="values must be JSON scalars"):
        remote.register("m", {"nested": {"a": 1}})


def test_events_arrive_in_order_with_their_positions(
    remote: RemoteMetadataStore, served: Served
) -> None:
    served.store.publish([b"a", b"b"])  # the node's own publisher (another thread)
    remote.publish([b"c"])
    cursor, got = remote.read(START, 0.0)
    assert (cursor, got) == ("3", [b"a", b"b", b"c"])
    assert remote.read("1", 0.0, count=1) == ("2", [b"b"])
    assert remote.read(cursor, 0.0) == (cursor, [])  # nothing new: same cursor


def test_a_read_reply_stays_under_the_message_limit(
    remote: RemoteMetadataStore, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "MAX_MESSAGE_BYTES", 200)  # 16 bytes of overhead each
    served.store.publish([bytes([n]) * 84 for n in range(5)])  # 100 bytes each, with overhead
    assert remote.read(START, 0.0) == ("2", [b"\x00" * 84, b"\x01" * 84])
    assert remote.read("2", 0.0) == ("4", [b"\x02" * 84, b"\x03" * 84])
    monkeypatch.setattr(service_module, "MAX_MESSAGE_BYTES", 10)  # one message always goes
    assert remote.read("4", 0.0) == ("5", [b"\x04" * 84])


def test_a_waiting_read_wakes_on_a_publish_from_the_node(
    remote: RemoteMetadataStore, served: Served
) -> None:
    cursor, _ = remote.read(START, 0.0)
    result: list[tuple[str, list[bytes]]] = []
    reader = threading.Thread(target=lambda: result.append(remote.read(cursor, 25.0)))
    reader.start()
    assert remote.heartbeat("x", 5.0) is False  # answered while the read waits
    served.store.publish([b"news"])
    reader.join(20.0)
    assert result == [("1", [b"news"])]


def test_bad_arguments_are_value_errors(remote: RemoteMetadataStore) -> None:
    with pytest.raises(ValueError, match=r"ttl_s must be in \[0.001, 86400\]"):
        remote.heartbeat("x", 0.0)
    with pytest.raises(ValueError, match=r"node_id must be a string of 1\.\.255 bytes"):
        remote.register("n" * 256, {})
    with pytest.raises(ValueError, match="cursor must be a cursor returned by Read"):
        remote.read("0-1", 0.0)
    assert remote.members() == {}  # nothing changed, still serving


def test_health_says_serving(served: Served) -> None:
    with grpc.insecure_channel(served.server.endpoint) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "strata.metadata.v1.Metadata"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


class _StalledService(metadata_pb2_grpc.MetadataServicer):
    """Accepts every call and never answers (until ``release``)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Members(self, request: object, context: object) -> metadata_pb2.MembersResponse:
        self.release.wait(30.0)
        return metadata_pb2.MembersResponse()

    def Read(self, request: object, context: object) -> metadata_pb2.ReadResponse:
        self.release.wait(30.0)
        return metadata_pb2.ReadResponse()


@pytest.fixture
def stalled_grpc_server() -> Iterator[str]:
    """A gRPC server whose Members and Read never answer."""
    service = _StalledService()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    metadata_pb2_grpc.add_MetadataServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    service.release.set()
    server.stop(None).wait(10)


@pytest.fixture
def silent_socket() -> Iterator[str]:
    """A peer that accepts TCP connections and never speaks HTTP/2."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("peer", ["stalled_grpc_server", "silent_socket"])
def test_a_stalled_server_fails_the_call_at_its_deadline(
    peer: str, request: pytest.FixtureRequest
) -> None:
    """Each call ends with DEADLINE_EXCEEDED, mapped to TimeoutError, instead of hanging."""
    store = RemoteMetadataStore(request.getfixturevalue(peer), timeout_s=0.5)
    try:
        with pytest.raises(TimeoutError, match=r"Members.*\(DEADLINE_EXCEEDED\)"):
            store.members()
        with pytest.raises(TimeoutError, match=r"Read.*\(DEADLINE_EXCEEDED\)"):
            store.read(START, 0.2)
    finally:
        store.close()


def test_a_restarted_server_is_reached_by_the_next_call(loop: asyncio.AbstractEventLoop) -> None:
    first = MetadataServer(EmbeddedMetadataStore(), "127.0.0.1", 0)
    port = on(loop, first.start())
    store = RemoteMetadataStore(first.endpoint)
    try:
        store.register("a", {"endpoint": "a:1"})
        on(loop, first.stop())
        again = MetadataServer(EmbeddedMetadataStore(), "127.0.0.1", port)
        on(loop, again.start())
        try:
            assert store.members() == {}  # the new incarnation's (empty) store, no error
        finally:
            on(loop, again.stop())
    finally:
        store.close()


def test_an_unreachable_server_is_a_connection_error() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = RemoteMetadataStore(f"127.0.0.1:{port}", timeout_s=5.0)
    try:
        with pytest.raises(ConnectionError, match=r"Heartbeat.*\(UNAVAILABLE\)"):
            store.heartbeat("n", 1.0)
    finally:
        store.close()


def test_following_the_stream_does_not_import_grpc() -> None:
    """Only the strata:// backend and the node's server import grpc: what follows the stream or
    publishes to it (the gateway's view, a node's agent, a worker's HBM publisher) stays light
    until it opens a strata:// store (kvstore.client: see test_kvstore_layering.py)."""
    code = (
        "import sys, kvstore.metadata, kvstore.cluster.view, kvstore.cluster.membership; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'strata_proto')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
