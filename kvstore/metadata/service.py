"""A store node's embedded metadata, served to its host over gRPC (proto/.../metadata.proto).

One host needs no Redis: ``strata serve`` runs one store node with ``--metadata embedded``, and the
other processes on the host -- the gateway (prefix-aware routing), the workers (publishing their
HBM-resident blocks as events with their instance id as source) -- open
``open_metadata_store("strata://HOST:PORT")``, a
:class:`~kvstore.metadata.remote.RemoteMetadataStore` that calls this service
(docs/design/kvstore.md §10.6). :class:`MetadataServer` is the node's server: the
``strata.metadata.v1.Metadata`` service and the standard ``grpc.health.v1`` health service
(SERVING while the node serves; NOT_SERVING once it stops) on one port, on the node's event loop.

Every argument is checked before the store is touched (node ids of 1..255 bytes, ``ttl_s`` in
[0.001, 86400], a cursor that ``Read`` returned, a ``count`` of at least 1 (more than 65536 is
clamped, as ``block_s`` is to 30 s)): a bad one gets INVALID_ARGUMENT and the service keeps
serving.

Long polls
    ``Read`` with ``block_s > 0`` and nothing new waits on the loop, not on a thread: the embedded
    store calls back after every append (from whichever thread published -- the node's own
    publisher thread, or the loop serving a remote ``Publish``), and one ``call_soon_threadsafe``
    per burst wakes every waiting reader, which reads again. A reader that still has nothing
    gets an empty batch at ``block_s`` (at most :data:`~kvstore.metadata.base.MAX_BLOCK_S`).
    Other calls -- on the same channel too: HTTP/2 streams are independent -- are answered
    meanwhile, so a view's long poll never delays a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvstore.metadata.base import MAX_BLOCK_S, MAX_MESSAGE_BYTES, START, STRATA_SCHEME
from kvstore.metadata.embedded import EmbeddedMetadataStore
from kvstore.metadata.messages import info_from_proto, info_to_proto
from strata_common.endpoints import bind_port, format_endpoint
from strata_common.grpc_auth import add_port
from strata_common.tls import TlsConfig
from strata_proto import metadata_pb2, metadata_pb2_grpc

__all__ = ["METADATA_SERVICE_NAME", "MetadataServer", "MetadataService"]

logger = logging.getLogger("kvstore.metadata.service")

METADATA_SERVICE_NAME: Final = "strata.metadata.v1.Metadata"
MAX_NODE_ID_BYTES: Final = 255
MAX_READ_COUNT: Final = 65536
MIN_TTL_S, MAX_TTL_S = 0.001, 86400.0
_MESSAGE_OVERHEAD_BYTES: Final = 16
"""Budget per stream message in a reply beyond its bytes (field tag and length), generously."""
SERVER_OPTIONS: Final = (
    # SO_REUSEPORT is gRPC's default; without turning it off a second node could bind the same
    # port and silently take half of the calls.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES + (1 << 20)),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES + (1 << 20)),
)

T = TypeVar("T")


def _node_id(value: str, name: str = "node_id") -> str:
    if not 0 < len(value.encode()) <= MAX_NODE_ID_BYTES:
        raise ValueError(f"{name} must be a string of 1..{MAX_NODE_ID_BYTES} bytes")
    return value


def _cursor(value: str) -> str:
    if not (value == START or (value.isascii() and value.isdigit())):
        raise ValueError("cursor must be a cursor returned by Read, or the start")
    return value


class MetadataService(metadata_pb2_grpc.MetadataServicer):
    """The Metadata RPCs over an :class:`EmbeddedMetadataStore` (on the event loop only)."""

    def __init__(self, store: EmbeddedMetadataStore) -> None:
        self._store = store
        self._loop: asyncio.AbstractEventLoop | None = None
        self._published = asyncio.Event()
        """Set (and replaced) after appends while readers wait; see :meth:`_wake`."""
        self._num_waiting = 0
        self._wake_lock = threading.Lock()
        self._wake_scheduled = False
        self._closed = False

    def open(self) -> None:
        """Start following the store's appends (call on the event loop that serves)."""
        self._loop = asyncio.get_running_loop()
        self._store.add_publish_listener(self._on_publish)

    def close(self) -> None:
        """Stop following; waiting reads are answered (with what there is) at once."""
        self._store.remove_publish_listener(self._on_publish)
        self._closed = True
        self._published.set()

    async def _call(
        self, context: grpc.aio.ServicerContext[Any, Any], rpc: str, work: Callable[[], T]
    ) -> T:
        try:
            return work()
        except ValueError as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except Exception:
            logger.exception("metadata: %s failed", rpc)
            code, message = grpc.StatusCode.INTERNAL, f"{rpc} failed; see the store node's log"
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    async def Register(
        self, request: metadata_pb2.RegisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> metadata_pb2.RegisterResponse:
        def work() -> metadata_pb2.RegisterResponse:
            self._store.register(_node_id(request.node_id), info_from_proto(request.info))
            return metadata_pb2.RegisterResponse()

        return await self._call(context, "Register", work)

    async def Deregister(
        self, request: metadata_pb2.DeregisterRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> metadata_pb2.DeregisterResponse:
        def work() -> metadata_pb2.DeregisterResponse:
            self._store.deregister(_node_id(request.node_id))
            return metadata_pb2.DeregisterResponse()

        return await self._call(context, "Deregister", work)

    async def Heartbeat(
        self, request: metadata_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> metadata_pb2.HeartbeatResponse:
        def work() -> metadata_pb2.HeartbeatResponse:
            ttl_s = request.ttl_s
            if not (math.isfinite(ttl_s) and MIN_TTL_S <= ttl_s <= MAX_TTL_S):
                raise ValueError(f"ttl_s must be in [{MIN_TTL_S:g}, {MAX_TTL_S:g}]")
            registered = self._store.heartbeat(_node_id(request.node_id), ttl_s)
            return metadata_pb2.HeartbeatResponse(registered=registered)

        return await self._call(context, "Heartbeat", work)

    async def Members(
        self, request: metadata_pb2.MembersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> metadata_pb2.MembersResponse:
        def work() -> metadata_pb2.MembersResponse:
            reply = metadata_pb2.MembersResponse()
            for node_id, info in self._store.members().items():
                reply.members[node_id].CopyFrom(info_to_proto(info))
            return reply

        return await self._call(context, "Members", work)

    async def Alive(
        self, request: metadata_pb2.AliveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> metadata_pb2.AliveResponse:
        def work() -> metadata_pb2.AliveResponse:
            alive = self._store.alive(request.node_ids)
            return metadata_pb2.AliveResponse(node_ids=sorted(alive))

        return await self._call(context, "Alive", work)

    async def RequestResync(
        self,
        request: metadata_pb2.RequestResyncRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> metadata_pb2.RequestResyncResponse:
        def work() -> metadata_pb2.RequestResyncResponse:
            self._store.request_resync(_node_id(request.node_id))
            return metadata_pb2.RequestResyncResponse()

        return await self._call(context, "RequestResync", work)

    async def TakeResync(
        self, request: metadata_pb2.TakeResyncRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> metadata_pb2.TakeResyncResponse:
        def work() -> metadata_pb2.TakeResyncResponse:
            taken = self._store.take_resync_request(_node_id(request.node_id))
            return metadata_pb2.TakeResyncResponse(taken=taken)

        return await self._call(context, "TakeResync", work)

    async def Reap(
        self, request: metadata_pb2.ReapRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> metadata_pb2.ReapResponse:
        def work() -> metadata_pb2.ReapResponse:
            node_id, info = _node_id(request.node_id), info_from_proto(request.info)
            reaped = self._store.reap(node_id, info, list(request.messages))
            return metadata_pb2.ReapResponse(reaped=reaped)

        return await self._call(context, "Reap", work)

    async def Publish(
        self, request: metadata_pb2.PublishRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> metadata_pb2.PublishResponse:
        def work() -> metadata_pb2.PublishResponse:
            self._store.publish(list(request.messages))
            return metadata_pb2.PublishResponse()

        return await self._call(context, "Publish", work)

    async def Read(
        self, request: metadata_pb2.ReadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> metadata_pb2.ReadResponse:
        def check() -> tuple[str, float, int]:
            block_s = request.block_s
            if not (block_s >= 0.0 and not math.isnan(block_s)):
                raise ValueError("block_s must be a number >= 0")
            if request.count < 1:
                raise ValueError("count must be at least 1")
            count = min(request.count, MAX_READ_COUNT)
            return _cursor(request.cursor), min(block_s, MAX_BLOCK_S), count

        cursor, block_s, count = await self._call(context, "Read", check)
        new_cursor, messages = await self._read(cursor, block_s, count)
        return _read_reply(new_cursor, messages)

    async def _read(self, cursor: str, block_s: float, count: int) -> tuple[str, list[bytes]]:
        """What the store has after ``cursor``, waiting up to ``block_s`` for something."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_s
        self._num_waiting += 1  # before reading: an append after the read then wakes us
        try:
            while True:
                published = self._published
                new_cursor, messages = self._store.read(cursor, 0.0, count)
                left = deadline - loop.time()
                if messages or left <= 0 or self._closed:
                    return new_cursor, messages
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(published.wait(), left)
        finally:
            self._num_waiting -= 1

    def _on_publish(self) -> None:
        """The store appended (any thread): wake the waiting reads on the loop, once a burst."""
        with self._wake_lock:
            if self._wake_scheduled or not self._num_waiting or self._loop is None:
                return
            self._wake_scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._wake_lock:
            self._wake_scheduled = False
        published, self._published = self._published, asyncio.Event()
        published.set()


def _read_reply(cursor: str, messages: Sequence[bytes]) -> metadata_pb2.ReadResponse:
    """The reply, with as many messages as fit :data:`MAX_MESSAGE_BYTES` (at least one; the
    cursor then points after the last one sent). An embedded store's cursor is a position."""
    size = 0
    for sent, message in enumerate(messages):
        size += len(message) + _MESSAGE_OVERHEAD_BYTES
        if size > MAX_MESSAGE_BYTES and sent > 0:
            cursor = str(int(cursor) - (len(messages) - sent))
            messages = messages[:sent]
            break
    return metadata_pb2.ReadResponse(cursor=cursor, messages=messages)


class MetadataServer:
    """A store node's metadata gRPC server: the Metadata service over its embedded store and the
    standard health service (``""`` and ``strata.metadata.v1.Metadata``), on one port.

    Use from the node, on its event loop::

        server = MetadataServer(store, "127.0.0.1", 0)   # 0: any free port
        port = await server.start()                      # health: SERVING
        ...
        await server.stop()                              # health: NOT_SERVING, then closed
    """

    _HEALTH_NAMES: Final = ("", METADATA_SERVICE_NAME)

    def __init__(
        self,
        store: EmbeddedMetadataStore,
        host: str,
        port: int,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        tls: TlsConfig | None = None,
    ) -> None:
        """``interceptors``: e.g. the secret-mode check of every call
        (:class:`strata_common.grpc_auth.ServerAuthInterceptor` with
        :func:`kvstore.cluster.access.metadata_policy`); none: every caller is trusted.
        ``tls``: serve mutual TLS under the cluster CA (the interceptor then takes each caller's
        identity from its certificate); None: plaintext."""
        self.host = host
        self.port = port
        """The port asked for; the bound one once started."""
        self._service = MetadataService(store)
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._interceptors = tuple(interceptors)
        self._tls = tls

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` (IPv6 in brackets) of the service."""
        return format_endpoint(self.host, self.port)

    @property
    def spec(self) -> str:
        """``strata://HOST:PORT``: the metadata spec the host's other processes open."""
        return STRATA_SCHEME + self.endpoint

    async def start(self) -> int:
        """Bind, serve, print ``kvstore metadata on strata://HOST:PORT``; returns the port.

        Raises OSError when the address cannot be bound."""
        if self._server is not None:
            raise RuntimeError("metadata server already started")
        server = grpc.aio.server(interceptors=self._interceptors, options=SERVER_OPTIONS)
        metadata_pb2_grpc.add_MetadataServicer_to_server(self._service, server)  # type: ignore[no-untyped-call]
        self._health = health.aio.HealthServicer()
        for name in self._HEALTH_NAMES:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = self.endpoint
        port = bind_port(add_port(server, self._tls), address, "the metadata service")
        self._service.open()
        await server.start()
        self._server, self.port = server, int(port)
        print(f"kvstore metadata on {self.spec}", flush=True)
        return self.port

    async def stop(self, grace_s: float = 1.0) -> None:
        """Health goes NOT_SERVING; waiting reads are answered; other calls get ``grace_s``."""
        server, self._server = self._server, None
        if server is None:
            return
        await self._health.enter_graceful_shutdown()
        self._service.close()
        await server.stop(grace_s)
