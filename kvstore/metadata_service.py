"""Node-served metadata: a store node's embedded MetadataStore, over its own wire protocol.

One host needs no Redis: ``strata serve`` runs one store node with ``--metadata embedded``, and the
other processes on the host -- the gateway (prefix-aware routing), the workers (publishing their
HBM-resident blocks as events with their instance id as source) -- open
``open_metadata_store("strata://HOST:PORT")``, a :class:`RemoteMetadataStore` that implements the
whole :class:`~kvstore.metadata.MetadataStore` protocol against the node (docs/design/kvstore.md
§14.6). The server side, :class:`MetadataService`, lives here; ``kvstore.server`` only dispatches
``Op.METADATA`` frames to it.

Wire format (inside an ``Op.METADATA`` frame, count 0; request and response alike)::

    u32 json_len | u32 num_blobs | JSON object (UTF-8) | num_blobs x (u32 len | bytes)

The JSON names the call and its arguments; blobs carry the opaque stream messages (publish, reap,
read replies) without base64. Calls::

    {"method": "register", "node_id": s, "info": {...}}          -> {}
    {"method": "deregister", "node_id": s}                        -> {}
    {"method": "heartbeat", "node_id": s, "ttl_s": x}             -> {"registered": b}
    {"method": "members"}                                         -> {"members": {...}}
    {"method": "alive", "node_ids": [s, ...]}                     -> {"alive": [s, ...]}
    {"method": "request_resync", "node_id": s}                    -> {}
    {"method": "take_resync_request", "node_id": s}               -> {"taken": b}
    {"method": "reap", "node_id": s, "info": {...}} + messages    -> {"reaped": b}
    {"method": "publish"} + messages                              -> {}
    {"method": "read", "cursor": s, "block_s": x, "count": n}     -> {"cursor": s} + messages

A malformed or invalid call is answered with status ``BAD_REQUEST`` and ``{"error": "..."}``; the
frame itself was well formed, so the connection stays open and the node keeps serving.

Long polls
    ``read`` with ``block_s > 0`` and nothing new is *parked*, not run on a thread and never
    blocking the loop: the service keeps a list of waiters, the embedded store calls back after
    every append (from whichever thread published -- the node's own publisher thread, or the loop
    serving a remote ``publish``), and one ``call_soon_threadsafe`` per burst re-reads for each
    waiter. A timer answers an empty batch at ``block_s`` (at most :data:`MAX_BLOCK_S`). The
    connection keeps reading and parsing meanwhile; its later responses queue behind the parked
    one (responses stay in request order), so :class:`RemoteMetadataStore` uses one connection
    per thread: a view's long poll never delays a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import socket
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from kvstore.metadata import START, EmbeddedMetadataStore, MetadataStore
from kvstore.wire.frame import (
    FRAME_HEADER_BYTES,
    MAX_METADATA_PAYLOAD,
    FrameError,
    FrameHeader,
    Op,
    Status,
    pack_frame_header,
)

__all__ = [
    "MAX_BLOCK_S",
    "MetadataService",
    "MetadataServiceError",
    "RemoteMetadataStore",
    "decode_call",
    "encode_call",
]

MAX_BLOCK_S: Final = 30.0
"""Longest a ``read`` may be parked; longer requests are clamped."""
MAX_NODE_ID_BYTES: Final = 255
MAX_READ_COUNT: Final = 65536
_COUNTS = struct.Struct("<II")
_BLOB_LEN = struct.Struct("<I")


class MetadataServiceError(RuntimeError):
    """The node refused a metadata call (bad arguments, or it serves no metadata)."""


# -- codec --------------------------------------------------------------------------------------


def encode_call(obj: Mapping[str, Any], blobs: Sequence[bytes] = ()) -> bytes:
    """One request or response body: counts, JSON, then the blobs."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    parts = [_COUNTS.pack(len(body), len(blobs)), body]
    for blob in blobs:
        parts.append(_BLOB_LEN.pack(len(blob)))
        parts.append(bytes(blob))
    return b"".join(parts)


def decode_call(data: bytes | bytearray | memoryview) -> tuple[dict[str, Any], list[bytes]]:
    """Inverse of :func:`encode_call`; ValueError unless the layout is exact."""
    view = memoryview(data).cast("B")
    if view.nbytes < _COUNTS.size:
        raise ValueError("metadata call shorter than its header")
    json_len, num_blobs = _COUNTS.unpack_from(view, 0)
    pos = _COUNTS.size + json_len
    if pos > view.nbytes:
        raise ValueError("metadata call truncated in its JSON")
    try:
        obj = json.loads(bytes(view[_COUNTS.size : pos]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"metadata call is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("metadata call is not a JSON object")
    if num_blobs > (view.nbytes - pos) // _BLOB_LEN.size:
        raise ValueError(f"metadata call claims {num_blobs} blobs")
    blobs: list[bytes] = []
    for _ in range(num_blobs):
        if pos + _BLOB_LEN.size > view.nbytes:
            raise ValueError("metadata call truncated in a blob length")
        (length,) = _BLOB_LEN.unpack_from(view, pos)
        pos += _BLOB_LEN.size
        if pos + length > view.nbytes:
            raise ValueError("metadata call truncated in a blob")
        blobs.append(bytes(view[pos : pos + length]))
        pos += length
    if pos != view.nbytes:
        raise ValueError(f"{view.nbytes - pos} stray bytes after a metadata call")
    return obj, blobs


def _node_id(call: Mapping[str, Any], name: str = "node_id") -> str:
    value = call.get(name)
    if not isinstance(value, str) or not 0 < len(value.encode()) <= MAX_NODE_ID_BYTES:
        raise ValueError(f"{name} must be a string of 1..{MAX_NODE_ID_BYTES} bytes")
    return value


def _number(call: Mapping[str, Any], name: str, low: float, high: float) -> float:
    value = call.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}]")
    return float(value)


def _info(call: Mapping[str, Any]) -> dict[str, Any]:
    value = call.get("info")
    if not isinstance(value, dict):
        raise ValueError("info must be a JSON object")
    return value


# -- server side ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Waiter:
    request_id: int
    cursor: str
    count: int
    future: asyncio.Future[bytes]
    timer: asyncio.TimerHandle | None = field(default=None)


class MetadataService:
    """Answers ``Op.METADATA`` frames from an :class:`EmbeddedMetadataStore` (event loop only).

    Until :meth:`serve` is called (a node without ``--metadata embedded``) every call is refused
    with ``BAD_REQUEST``: that node has no metadata of its own to serve.
    """

    def __init__(self) -> None:
        self._store: EmbeddedMetadataStore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[_Waiter] = []
        self._wake_lock = threading.Lock()
        self._wake_scheduled = False
        self.num_calls = self.num_errors = 0

    @property
    def serving(self) -> bool:
        return self._store is not None

    def serve(self, store: MetadataStore) -> bool:
        """Serve ``store`` if it is an embedded one (call on the event loop); False otherwise
        (a node on Redis metadata: its peers read Redis, not the node)."""
        if not isinstance(store, EmbeddedMetadataStore):
            return False
        self._loop = asyncio.get_running_loop()
        self._store = store
        store.add_publish_listener(self._on_publish)
        return True

    def close(self) -> None:
        """Stop serving: parked reads are answered empty, later calls refused."""
        if self._store is not None:
            self._store.remove_publish_listener(self._on_publish)
        self._store = None
        for waiter in self._waiters:
            self._finish(waiter, waiter.cursor, [])
        self._waiters.clear()

    def handle(self, request_id: int, payload: memoryview) -> bytes | asyncio.Future[bytes]:
        """The whole response frame for one request, or a future of it (a parked read).

        ``payload`` is only read during this call (it is the connection's receive buffer)."""
        self.num_calls += 1
        try:
            call, blobs = decode_call(payload)
            if self._store is None:
                raise ValueError("this node serves no metadata (start it with --metadata embedded)")
            return self._run(self._store, request_id, call, blobs)
        except ValueError as exc:
            self.num_errors += 1
            return _response(request_id, {"error": str(exc)}, (), Status.BAD_REQUEST)

    def _run(
        self,
        store: EmbeddedMetadataStore,
        request_id: int,
        call: Mapping[str, Any],
        blobs: list[bytes],
    ) -> bytes | asyncio.Future[bytes]:
        method = call.get("method")
        result: dict[str, Any] = {}
        if method == "register":
            store.register(_node_id(call), _info(call))
        elif method == "deregister":
            store.deregister(_node_id(call))
        elif method == "heartbeat":
            ttl_s = _number(call, "ttl_s", 0.001, 86400.0)
            result["registered"] = store.heartbeat(_node_id(call), ttl_s)
        elif method == "members":
            result["members"] = store.members()
        elif method == "alive":
            node_ids = call.get("node_ids")
            if not isinstance(node_ids, list) or not all(isinstance(n, str) for n in node_ids):
                raise ValueError("node_ids must be a list of strings")
            result["alive"] = sorted(store.alive(node_ids))
        elif method == "request_resync":
            store.request_resync(_node_id(call))
        elif method == "take_resync_request":
            result["taken"] = store.take_resync_request(_node_id(call))
        elif method == "reap":
            result["reaped"] = store.reap(_node_id(call), _info(call), blobs)
        elif method == "publish":
            store.publish(blobs)
        elif method == "read":
            return self._read(store, request_id, call)
        else:
            raise ValueError(f"unknown metadata method {method!r}")
        return _response(request_id, result, ())

    def _read(
        self, store: EmbeddedMetadataStore, request_id: int, call: Mapping[str, Any]
    ) -> bytes | asyncio.Future[bytes]:
        cursor = call.get("cursor")
        if not isinstance(cursor, str) or not (cursor == START or cursor.isdigit()):
            raise ValueError("cursor must be a cursor returned by read, or the start")
        block_s = min(_number(call, "block_s", 0.0, math.inf), MAX_BLOCK_S)
        count = int(_number(call, "count", 1, MAX_READ_COUNT))
        new_cursor, messages = store.read(cursor, 0.0, count)
        if messages or block_s <= 0.0:
            return _response(request_id, {"cursor": new_cursor}, messages)
        assert self._loop is not None
        waiter = _Waiter(request_id, cursor, count, self._loop.create_future())
        waiter.timer = self._loop.call_later(block_s, self._expire, waiter)
        self._waiters.append(waiter)
        return waiter.future

    def _on_publish(self) -> None:
        """The store appended (any thread): re-check the parked reads on the loop, once."""
        with self._wake_lock:
            if self._wake_scheduled or not self._waiters or self._loop is None:
                return
            self._wake_scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._wake_lock:
            self._wake_scheduled = False
        store = self._store
        if store is None:
            return
        still: list[_Waiter] = []
        for waiter in self._waiters:
            cursor, messages = store.read(waiter.cursor, 0.0, waiter.count)
            if messages:
                self._finish(waiter, cursor, messages)
            else:
                still.append(waiter)
        self._waiters = still

    def _expire(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            self._finish(waiter, waiter.cursor, [])

    @staticmethod
    def _finish(waiter: _Waiter, cursor: str, messages: list[bytes]) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
        if not waiter.future.done():
            waiter.future.set_result(_response(waiter.request_id, {"cursor": cursor}, messages))


def _response(
    request_id: int, obj: Mapping[str, Any], blobs: Sequence[bytes], status: Status = Status.OK
) -> bytes:
    body = encode_call(obj, blobs)
    if len(body) > MAX_METADATA_PAYLOAD:  # e.g. a huge members map: refuse, do not garble
        status = Status.BAD_REQUEST
        body = encode_call({"error": f"response of {len(body)} bytes is too large"})
    return pack_frame_header(Op.METADATA, request_id, 0, len(body), status) + body


# -- client side ---------------------------------------------------------------------------------


class _Connection(threading.local):
    sock: socket.socket | None = None


class RemoteMetadataStore:
    """:class:`~kvstore.metadata.MetadataStore` served by a store node (``strata://HOST:PORT``).

    Thread-safe: one blocking connection per calling thread, so a long-polling reader never
    delays another thread's heartbeat. A call on a connection found broken (the node restarted)
    reconnects and retries once; otherwise failures raise ``OSError`` (unreachable, timed out)
    or :class:`MetadataServiceError` (refused) -- the callers (NodeAgent's threads, ClusterView)
    log and retry.
    """

    def __init__(self, endpoint: str, timeout_s: float = 10.0) -> None:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"strata metadata endpoint must be HOST:PORT, got {endpoint!r}")
        self.endpoint = endpoint
        self._address = (host, int(port))
        self._timeout = timeout_s
        self._local = _Connection()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._ids = itertools.count(1)

    # -- MetadataStore ----------------------------------------------------------------------

    def register(self, node_id: str, info: Mapping[str, Any]) -> None:
        self._call({"method": "register", "node_id": node_id, "info": dict(info)})

    def deregister(self, node_id: str) -> None:
        self._call({"method": "deregister", "node_id": node_id})

    def heartbeat(self, node_id: str, ttl_s: float) -> bool:
        result, _ = self._call({"method": "heartbeat", "node_id": node_id, "ttl_s": ttl_s})
        return bool(result.get("registered"))

    def members(self) -> dict[str, dict[str, Any]]:
        result, _ = self._call({"method": "members"})
        members = result.get("members")
        if not isinstance(members, dict):
            raise MetadataServiceError("members reply without members")
        return {str(node): dict(info) for node, info in members.items()}

    def alive(self, node_ids: Iterable[str]) -> set[str]:
        nodes = list(node_ids)
        if not nodes:
            return set()
        result, _ = self._call({"method": "alive", "node_ids": nodes})
        return {str(node) for node in result.get("alive", ())}

    def request_resync(self, node_id: str) -> None:
        self._call({"method": "request_resync", "node_id": node_id})

    def take_resync_request(self, node_id: str) -> bool:
        result, _ = self._call({"method": "take_resync_request", "node_id": node_id})
        return bool(result.get("taken"))

    def reap(self, node_id: str, info: Mapping[str, Any], messages: Sequence[bytes]) -> bool:
        call = {"method": "reap", "node_id": node_id, "info": dict(info)}
        result, _ = self._call(call, messages)
        return bool(result.get("reaped"))

    def publish(self, messages: Sequence[bytes]) -> None:
        if messages:
            self._call({"method": "publish"}, messages)

    def read(self, cursor: str, block_s: float, count: int = 1024) -> tuple[str, list[bytes]]:
        block_s = min(max(block_s, 0.0), MAX_BLOCK_S)
        call = {"method": "read", "cursor": cursor, "block_s": block_s, "count": count}
        result, messages = self._call(call, (), timeout_s=self._timeout + block_s)
        new_cursor = result.get("cursor")
        if not isinstance(new_cursor, str):
            raise MetadataServiceError("read reply without a cursor")
        return new_cursor, messages

    def close(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()

    # -- call machinery -------------------------------------------------------------------------

    def _call(
        self,
        call: Mapping[str, Any],
        blobs: Sequence[bytes] = (),
        timeout_s: float | None = None,
    ) -> tuple[dict[str, Any], list[bytes]]:
        body = encode_call(call, blobs)
        if len(body) > MAX_METADATA_PAYLOAD:
            raise MetadataServiceError(f"metadata call of {len(body)} bytes is too large")
        timeout = self._timeout if timeout_s is None else timeout_s
        reused = self._local.sock is not None
        try:
            return self._exchange(body, timeout)
        except (ConnectionError, FrameError) as exc:
            self._drop()
            if not reused:
                raise ConnectionError(f"metadata at {self.endpoint}: {exc}") from exc
        except OSError:
            self._drop()
            raise
        try:  # the connection had gone stale (the node restarted): once more, fresh
            return self._exchange(body, timeout)
        except OSError:
            self._drop()
            raise

    def _exchange(self, body: bytes, timeout_s: float) -> tuple[dict[str, Any], list[bytes]]:
        sock = self._connect()
        sock.settimeout(timeout_s)
        request_id = next(self._ids) & 0xFFFFFFFF
        sock.sendall(pack_frame_header(Op.METADATA, request_id, 0, len(body)) + body)
        header = FrameHeader.decode(_recv_exact(sock, FRAME_HEADER_BYTES))
        if header.opcode is not Op.METADATA or header.request_id != request_id:
            raise FrameError(f"unexpected reply {header.opcode.name}/{header.request_id}")
        if header.payload_len > MAX_METADATA_PAYLOAD:
            raise FrameError(f"metadata reply of {header.payload_len} bytes")
        try:
            result, blobs = decode_call(_recv_exact(sock, header.payload_len))
        except ValueError as exc:
            raise FrameError(f"garbled metadata reply: {exc}") from exc
        if header.status != Status.OK:
            raise MetadataServiceError(str(result.get("error", f"status {header.status}")))
        return result, blobs

    def _connect(self) -> socket.socket:
        sock = self._local.sock
        if sock is not None:
            return sock
        sock = socket.create_connection(self._address, timeout=self._timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._local.sock = sock
        with self._lock:
            self._sockets.add(sock)
        return sock

    def _drop(self) -> None:
        sock, self._local.sock = self._local.sock, None
        if sock is not None:
            with self._lock:
                self._sockets.discard(sock)
            with contextlib.suppress(OSError):
                sock.close()


def _recv_exact(sock: socket.socket, nbytes: int) -> bytes:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("the node closed the connection")
        got += n
    return bytes(buf)
