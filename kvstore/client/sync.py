"""KVStoreClient: the synchronous client of one store node.

Synchronous on purpose: its main caller, Strata's KV connector, runs inside vLLM's model-runner
thread, where there is no event loop to await on. It uses one blocking TCP socket (``TCP_NODELAY``;
timeouts from ``timeout_s``), sends a block with one gathered ``sendmsg`` (frame header, block
header and the caller's buffer, never concatenated) and receives payloads with ``recv_into``
straight into the caller's buffer (:meth:`KVStoreClient.get_into`) -- no intermediate copies.

Concurrency
    One lock serialises operations: a socket carries one ordered stream of frames. Calls from
    several threads are safe but take turns; use one client per thread for parallel transfers.

Batches
    :meth:`~KVStoreClient.put_many` and :meth:`~KVStoreClient.get_many_into` pipeline: they keep up
    to ``PIPELINE_WINDOW`` requests in flight and read responses as they come, so a batch of N
    blocks costs about one round trip plus N transfer times. The window is bounded so that
    neither side can block on a full socket buffer while the other waits for it (the node stops
    reading a connection whose responses are not being read).

Failures (callers fall back to recomputing the KV -- the store is a cache)
    * :class:`KVStoreUnavailable`: the node cannot be reached, the connection broke, or a reply
      did not come within ``timeout_s``. A connection found broken at the start of a call (the
      node restarted, an idle connection was dropped) is re-opened and the call retried once,
      which is safe because every operation is idempotent (a retried PUT answers EXISTS).
    * :class:`KVStoreCorruptError`: a block failed its checksum or named another key. Raised, not
      reported as a miss, so that corruption is seen and counted rather than silently recomputed;
      it subclasses :class:`KVStoreError`, so a caller that treats every store error as a miss
      still works. The connection stays usable (the frame was read completely).
    * :class:`KVStoreError`: anything else the node refused (e.g. a block above its size limit).

Transports (kvstore.transport.base)
    On connecting, the client picks a data path for this pair of endpoints, in the order of
    ``transports`` (default: shared memory, RDMA, TCP): shared memory when the node's arena file
    is provably the one it can open here (kernel boot id, device, inode, size -- not the
    address), RDMA when both ends have a device (never on the development machines:
    kvstore.transport.rdma),
    else TCP. Each skipped path is logged once with its reason (``skipped_transports``). With a
    one-sided path (shared memory, RDMA) a batch of GETs is one ``LEASE_BATCH`` round trip per
    ``LEASE_BATCH_KEYS`` keys (two batches in flight, so the next reply overlaps this copy), a
    copy out of the arena, a checksum per block and one ``RELEASE_BATCH`` (no reply); a batch of
    PUTs is ``RESERVE_BATCH`` (the node's two-phase put), a copy into the arena and
    ``COMMIT_BATCH`` (the node verifies every checksum). A batch the node will not reserve at
    once is sent over TCP instead. Disable shared memory with ``use_shm=False``.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import xxhash

from kvstore.blocks.format import (
    BLOCK_HEADER_BYTES,
    BLOCK_MAGIC,
    BlockDType,
    BlockHeader,
    checksum,
    encode_header,
    verify,
)
from kvstore.blocks.tier import Tier
from kvstore.errors import (
    KVStoreConnectionLost,
    KVStoreCorruptError,
    KVStoreError,
    KVStoreTimeout,
    KVStoreUnavailable,
)
from kvstore.transport.base import (
    DEFAULT_PREFERENCE,
    RemoteMemory,
    SkippedTransport,
    TransportKind,
    TransportUnavailable,
    select_transport,
)
from kvstore.transport.rdma import RdmaClientMemory, local_rdma
from kvstore.transport.shm import ShmMemory
from kvstore.transport.tcp import recv_exact
from kvstore.wire import replies, requests
from kvstore.wire.frame import (
    FRAME_HEADER_BYTES,
    FrameHeader,
    Op,
    Status,
)
from kvstore.wire.messages import LEASE_DEFERRED, SHM_LEASE, RdmaEndpointInfo
from kvstore.wire.types import NodeMatch, PutStatus
from strata_common.endpoints import parse_endpoint

__all__ = ["KVStoreClient"]

logger = logging.getLogger(__name__)

PIPELINE_WINDOW = 32
"""Requests kept in flight by the batch methods (bounded: see "Batches" above)."""
LEASE_BATCH_KEYS = 128
"""Keys per LEASE_BATCH round trip on a one-sided transport."""
_HASH_PIECE_BYTES = 256 * 1024
_ARENA_HEADER = struct.Struct("<4s4x16sQQ")
"""Magic, key, payload length and checksum of a block header (kvstore.blocks.format's layout)."""
RESERVE_BATCH_BLOCKS = 64
RESERVE_BATCH_BYTES = 16 * 1024 * 1024
"""Bounds of one RESERVE_BATCH (what one round trip reserves in the node's arena)."""

_T = TypeVar("_T")
_Buffer = bytes | bytearray | memoryview


class _ConnectionBroken(Exception):
    """Internal: the socket failed; the call may be retried on a new connection."""


def _nbytes(view: memoryview | None) -> int | None:
    return None if view is None else view.nbytes


class KVStoreClient:
    """Blocking, thread-safe client of one store node at ``endpoint`` (``"host:port"``).

    Connects lazily on first use, so constructing a client never fails because the node is down.
    ``transports`` is the order in which data paths are tried (TCP always ends it).
    """

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 10.0,
        *,
        use_shm: bool = True,
        transports: Sequence[TransportKind] = DEFAULT_PREFERENCE,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._preference = tuple(
            TransportKind(k) for k in transports if use_shm or k != TransportKind.SHM
        )
        self._memory: RemoteMemory | None = None
        self._kind = TransportKind.TCP
        self.skipped_transports: tuple[SkippedTransport, ...] = ()
        """Data paths tried on the last connect and not used, with the reasons."""
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        endpoint_ = parse_endpoint(endpoint)
        self._address = (endpoint_.host, endpoint_.port)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._frame_header = bytearray(FRAME_HEADER_BYTES)
        self._block_header = bytearray(BLOCK_HEADER_BYTES)

    # -- public API -------------------------------------------------------------------------------

    @property
    def transport(self) -> TransportKind:
        """The data path in use (``"shm"``, ``"rdma"`` or ``"tcp"``); TCP until connected."""
        return self._kind

    def put(
        self,
        key: bytes,
        data: _Buffer,
        *,
        dtype: BlockDType = BlockDType.RAW,
        shape: Sequence[int] | None = None,
    ) -> PutStatus:
        """Store ``data`` under ``key``: OK, EXISTS (already there; unchanged) or FULL (refused)."""
        requests.check_key(key)
        view = requests.as_bytes_view(data)
        item = _PutItem(key, view, encode_header(key, view, dtype, shape))  # validates the shape

        def run(sock: socket.socket) -> PutStatus:
            if self._memory is not None and self._memory.writable:
                return self._reserve_put(sock, [item])[0]
            request_id = self._send_put(sock, item.block_header(), view)
            return self._read_put_response(sock, request_id)

        return self._call(run)

    def put_many(self, items: Sequence[tuple[bytes, _Buffer]]) -> list[PutStatus]:
        """Store several blocks, pipelined; returns one status per item, in order."""
        prepared = []
        for key, data in items:
            requests.check_key(key)
            prepared.append(_PutItem(key, requests.as_bytes_view(data)))

        def run(sock: socket.socket) -> list[PutStatus]:
            if self._memory is not None and self._memory.writable:
                return self._reserve_put(sock, prepared)
            return self._tcp_put_many(sock, prepared)

        return self._call(run)

    def get(self, key: bytes) -> bytes | None:
        """Return the block's payload, or None on a miss. Copies once more than :meth:`get_into`."""
        requests.check_key(key)

        def run(sock: socket.socket) -> bytes | None:
            if self._memory is not None:
                copied = self._lease_get(sock, [key], [None])[0]
                return None if copied is None else bytes(copied)
            request_id = self._send_get(sock, key)
            header = self._read_get_header(sock, key, request_id)
            if header is None:
                return None
            payload = bytearray(header.payload_nbytes)
            self._recv_payload(sock, header, memoryview(payload))
            return bytes(payload)

        return self._call(run)

    def get_into(self, key: bytes, out: _Buffer) -> int | None:
        """Receive the block's payload into ``out``; returns its length, or None on a miss.

        ``out`` must be a writable contiguous buffer at least as large as the block (else
        KVStoreError, connection kept). After an exception its contents are unspecified.
        """
        requests.check_key(key)
        target = requests.as_bytes_view(out)
        if target.readonly:
            raise ValueError("out must be writable")

        def run(sock: socket.socket) -> int | None:
            if self._memory is not None:
                return _nbytes(self._lease_get(sock, [key], [target])[0])
            request_id = self._send_get(sock, key)
            return self._read_get_into(sock, key, request_id, target)

        return self._call(run)

    def get_many_into(self, keys: Sequence[bytes], outs: Sequence[_Buffer]) -> list[int | None]:
        """:meth:`get_into` for many blocks, pipelined; one result per key, in order."""
        if len(keys) != len(outs):
            raise ValueError("keys and outs differ in length")
        targets = []
        for key, out in zip(keys, outs, strict=True):
            requests.check_key(key)
            target = requests.as_bytes_view(out)
            if target.readonly:
                raise ValueError("outs must be writable")
            targets.append(target)

        def run(sock: socket.socket) -> list[int | None]:
            if self._memory is not None:
                return [_nbytes(v) for v in self._lease_get(sock, keys, list(targets))]
            return self._pipeline(
                sock,
                len(keys),
                lambda i: self._send_get(sock, keys[i]),
                lambda i, rid: self._read_get_into(sock, keys[i], rid, targets[i]),
            )

        return self._call(run)

    def match_prefix(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys of a prompt's key chain that the node holds (any tier)."""
        matched = 0
        for chunk in requests.key_chunks(keys):
            found = self._keyed(Op.MATCH_PREFIX, chunk)[0].count
            matched += found
            if found < len(chunk):
                break
        return matched

    def match_prefix_tiers(self, keys: Sequence[bytes]) -> NodeMatch:
        """:meth:`match_prefix` with the tier of each matched block (DRAM or SSD).

        A node without tier information (an older node) reports every block as DRAM.
        """
        tiers: list[Tier] = []
        for chunk in requests.key_chunks(keys):
            found = replies.decode_match_tiers(*self._keyed(Op.MATCH_PREFIX, chunk))
            tiers.extend(found)
            if len(found) < len(chunk):
                break
        return NodeMatch(len(tiers), tuple(tiers))

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is stored (committed) on the node, in any tier."""
        present: list[bool] = []
        for chunk in requests.key_chunks(keys):
            present.extend(replies.decode_exists(*self._keyed(Op.EXISTS, chunk)))
        return present

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove blocks; returns how many were present."""
        return sum(self._keyed(Op.DELETE, chunk)[0].count for chunk in requests.key_chunks(keys))

    def stats(self) -> dict[str, Any]:
        """The node's counters and occupancy (see kvstore.node.NodeStats)."""
        return self._call(lambda sock: self._json_request(sock, Op.STATS))

    def close(self) -> None:
        """Close the connection and unmap the arena. The client can be used again afterwards."""
        with self._lock:
            self._drop_connection()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- call machinery ---------------------------------------------------------------------------

    def _call(self, fn: Callable[[socket.socket], _T]) -> _T:
        """Run ``fn`` on the connection under the lock; reconnect and retry once if it was stale."""
        with self._lock:
            reused = self._sock is not None
            sock = self._connect()
            try:
                return fn(sock)
            except _ConnectionBroken as exc:
                self._drop_connection()
                if not reused:
                    raise KVStoreConnectionLost(f"kvstore node {self.endpoint}: {exc}") from exc
                logger.info("connection to %s broke (%s); reconnecting once", self.endpoint, exc)
            sock = self._connect()
            try:
                return fn(sock)
            except _ConnectionBroken as exc:
                self._drop_connection()
                raise KVStoreConnectionLost(f"kvstore node {self.endpoint}: {exc}") from exc

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        try:
            sock = socket.create_connection(self._address, timeout=self.timeout_s)
        except OSError as exc:
            raise KVStoreUnavailable(f"cannot connect to {self.endpoint}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        try:
            selection = select_transport(
                self._preference,
                {
                    TransportKind.SHM: lambda: self._attach_shm(sock),
                    TransportKind.RDMA: lambda: self._attach_rdma(sock),
                },
            )
        except _ConnectionBroken as exc:
            self._drop_connection()
            raise KVStoreConnectionLost(f"kvstore node {self.endpoint}: {exc}") from exc
        self._memory, self._kind = selection.memory, selection.kind
        self.skipped_transports = selection.skipped
        # What failed once fails again (no device, another host): do not retry on reconnects.
        failed = {skip.kind for skip in selection.skipped}
        self._preference = tuple(k for k in self._preference if k not in failed)
        return sock

    def _drop_connection(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
        if self._memory is not None:
            memory, self._memory = self._memory, None
            self._kind = TransportKind.TCP
            memory.close()

    def _pipeline(
        self,
        sock: socket.socket,
        count: int,
        send: Callable[[int], int],
        receive: Callable[[int, int], _T],
    ) -> list[_T]:
        in_flight: deque[tuple[int, int]] = deque()
        results: list[_T] = []
        sent = 0
        while len(results) < count:
            while sent < count and len(in_flight) < PIPELINE_WINDOW:
                in_flight.append((sent, send(sent)))
                sent += 1
            index, request_id = in_flight.popleft()
            try:
                results.append(receive(index, request_id))
            except KVStoreError:
                # Keep the stream in step: read the replies already on their way, then raise.
                self._drain(sock, in_flight)
                raise
        return results

    def _drain(self, sock: socket.socket, in_flight: Iterable[tuple[object, int]]) -> None:
        """Read and discard the replies of requests in flight; release any leases they grant."""
        try:
            for _index, request_id in in_flight:
                header = self._read_header(sock, request_id)
                if header.opcode is Op.GET_SHM and header.status == Status.OK:
                    body = self._recv_body(sock, header)
                    self._sendall(sock, [requests.release(SHM_LEASE.unpack(body)[0])])
                elif header.opcode is Op.LEASE_BATCH and header.status == Status.OK:
                    body = self._recv_body(sock, header)
                    batch = replies.decode_lease_batch(header, body, header.count)
                    self._sendall(sock, [requests.release_batch(batch.batch_id)])
                else:
                    self._skip(sock, header.payload_len)
        except (KVStoreError, _ConnectionBroken, struct.error):
            self._drop_connection()  # the node releases whatever this connection held

    # -- framing ----------------------------------------------------------------------------------

    def _send_put(self, sock: socket.socket, block_header: bytes, data: memoryview) -> int:
        request_id = next(self._ids) & 0xFFFFFFFF
        self._sendall(sock, requests.put(request_id, block_header, data))
        return request_id

    def _send_get(self, sock: socket.socket, key: bytes) -> int:
        request_id = next(self._ids) & 0xFFFFFFFF
        self._sendall(sock, [requests.get(request_id, key)])
        return request_id

    def _sendall(self, sock: socket.socket, parts: list[_Buffer]) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        try:
            while views:
                sent = sock.sendmsg(views)
                while views and sent >= views[0].nbytes:
                    sent -= views[0].nbytes
                    views.pop(0)
                if views and sent:
                    views[0] = views[0][sent:]
        except TimeoutError as exc:
            self._drop_connection()
            raise KVStoreTimeout(f"kvstore node {self.endpoint}: send timed out") from exc
        except OSError as exc:
            raise _ConnectionBroken(f"send failed: {exc}") from exc

    def _recv_exact(self, sock: socket.socket, target: memoryview) -> None:
        try:
            recv_exact(sock, target)
        except TimeoutError as exc:
            self._drop_connection()
            raise KVStoreTimeout(
                f"kvstore node {self.endpoint}: no reply within {self.timeout_s:g}s"
            ) from exc
        except OSError as exc:
            raise _ConnectionBroken(f"receive failed: {exc}") from exc

    def _read_header(self, sock: socket.socket, request_id: int) -> FrameHeader:
        self._recv_exact(sock, memoryview(self._frame_header))
        try:
            return replies.decode_reply_header(self._frame_header, 0, request_id)
        except KVStoreError:
            self._drop_connection()  # out of step: nothing more on it can be trusted
            raise

    def _recv_body(self, sock: socket.socket, header: FrameHeader) -> bytearray:
        body = bytearray(header.payload_len)
        self._recv_exact(sock, memoryview(body))
        return body

    def _skip(self, sock: socket.socket, nbytes: int) -> None:
        if not nbytes:
            return
        scratch = memoryview(bytearray(min(nbytes, 1 << 20)))
        while nbytes:
            step = min(nbytes, scratch.nbytes)
            self._recv_exact(sock, scratch[:step])
            nbytes -= step

    def _read_put_response(self, sock: socket.socket, request_id: int) -> PutStatus:
        header = self._read_header(sock, request_id)
        self._skip(sock, header.payload_len)
        return replies.put_status(header.status)

    def _read_get_header(
        self, sock: socket.socket, key: bytes, request_id: int
    ) -> BlockHeader | None:
        header = self._read_header(sock, request_id)
        try:
            hit = replies.get_hit(header)
        except KVStoreError:
            self._skip(sock, header.payload_len)
            raise
        if not hit:
            self._skip(sock, header.payload_len)
            return None
        self._recv_exact(sock, memoryview(self._block_header))
        try:
            return replies.decode_block_header(self._block_header, header.payload_len, key)
        except KVStoreError:
            self._skip(sock, header.payload_len - BLOCK_HEADER_BYTES)
            raise

    def _recv_payload(self, sock: socket.socket, block: BlockHeader, target: memoryview) -> int:
        nbytes = block.payload_nbytes
        if nbytes > target.nbytes:
            self._skip(sock, nbytes)
            raise replies.block_too_large(nbytes, target.nbytes)
        payload = target[:nbytes]
        self._recv_exact(sock, payload)
        if not verify(block, payload):
            raise replies.corrupt_block(block.key)
        return nbytes

    def _read_get_into(
        self, sock: socket.socket, key: bytes, request_id: int, target: memoryview
    ) -> int | None:
        block = self._read_get_header(sock, key, request_id)
        return None if block is None else self._recv_payload(sock, block, target)

    def _keyed(self, op: Op, keys: Sequence[bytes]) -> tuple[FrameHeader, bytearray]:
        """One MATCH_PREFIX, EXISTS or DELETE round trip: the reply's header and body."""

        def run(sock: socket.socket) -> tuple[FrameHeader, bytearray]:
            request_id = next(self._ids) & 0xFFFFFFFF
            self._sendall(sock, requests.keyed(op, request_id, keys))
            header = self._read_header(sock, request_id)
            body = self._recv_body(sock, header)
            replies.check_ok(header)
            return header, body

        return self._call(run)

    def _json_request(self, sock: socket.socket, op: Op) -> dict[str, Any]:
        request_id = next(self._ids) & 0xFFFFFFFF
        self._sendall(sock, [requests.empty(op, request_id)])
        header = self._read_header(sock, request_id)
        return replies.decode_json(header, self._recv_body(sock, header))

    # -- one-sided transports (shared memory, RDMA) ---------------------------------------------

    def _attach_shm(self, sock: socket.socket) -> RemoteMemory:
        """Map the node's arena if it is provably the same file on this host."""
        try:
            info = self._json_request(sock, Op.SHM_INFO)
        except KVStoreUnavailable:
            raise
        except KVStoreError as exc:
            raise TransportUnavailable(f"no shared-memory info from the node ({exc})") from exc
        memory = ShmMemory.attach(info)
        logger.info("kvstore node %s is local: blocks move through shared memory", self.endpoint)
        return memory

    def _attach_rdma(self, sock: socket.socket) -> RemoteMemory:
        """Connect a queue pair to the node's registered arena (RDMA_CONNECT)."""
        probe = local_rdma()
        if not probe.available:
            raise TransportUnavailable(probe.reason)
        memory = RdmaClientMemory()
        try:
            request_id = next(self._ids) & 0xFFFFFFFF
            self._sendall(sock, [requests.rdma_connect(request_id, memory.local_info())])
            header = self._read_header(sock, request_id)
            body = self._recv_body(sock, header)
            if header.status != Status.OK:
                reason = body.decode(errors="replace") or f"status {header.status}"
                raise TransportUnavailable(f"the node refused RDMA: {reason}")
            try:
                memory.connect(RdmaEndpointInfo.decode(body))
            except ValueError as exc:
                raise TransportUnavailable(f"bad RDMA_CONNECT reply: {exc}") from exc
        except BaseException:
            memory.close()
            raise
        return memory

    def _lease_get(
        self, sock: socket.socket, keys: Sequence[bytes], targets: Sequence[memoryview | None]
    ) -> list[memoryview | None]:
        """GETs through the one-sided transport: LEASE_BATCH, copy, verify, RELEASE_BATCH.

        Copies into ``targets[i]`` (or a new buffer where it is None); returns the filled part of
        each, None for a miss. A batch's RELEASE_BATCH goes out in the same ``sendmsg`` as the
        next LEASE_BATCH (a system call per frame costs as much as copying a few blocks here).
        """
        results: list[memoryview | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        while todo:  # keys the node deferred (on SSD, beyond its per-batch reads) come back
            chunks = [todo[i : i + LEASE_BATCH_KEYS] for i in range(0, len(todo), LEASE_BATCH_KEYS)]
            todo = []
            in_flight: deque[tuple[list[int], int]] = deque()
            release: list[_Buffer] = []  # frames to send with the next request
            sent = 0
            while sent < len(chunks) or in_flight:
                frames = release
                while sent < len(chunks) and len(in_flight) < 2:
                    chunk = chunks[sent]
                    request_id = next(self._ids) & 0xFFFFFFFF
                    batch = [keys[i] for i in chunk]
                    frames = [*frames, *requests.keyed(Op.LEASE_BATCH, request_id, batch)]
                    in_flight.append((chunk, request_id))
                    sent += 1
                if frames:
                    self._sendall(sock, frames)
                chunk, request_id = in_flight.popleft()
                try:
                    deferred, release = self._copy_leased(
                        sock, request_id, chunk, keys, targets, results
                    )
                except KVStoreError:
                    self._drain(sock, in_flight)
                    raise
                todo += deferred
            if release:
                self._sendall(sock, release)
        return results

    def _copy_leased(
        self,
        sock: socket.socket,
        request_id: int,
        chunk: list[int],
        keys: Sequence[bytes],
        targets: Sequence[memoryview | None],
        results: list[memoryview | None],
    ) -> tuple[list[int], list[_Buffer]]:
        """Handle one LEASE_BATCH reply: copy and verify its blocks.

        Returns the indices the node deferred and the RELEASE_BATCH frame to send; on an error
        it sends that frame itself before raising.
        """
        memory = self._memory
        assert memory is not None
        header = self._read_header(sock, request_id)
        body = self._recv_body(sock, header)
        try:
            reply = replies.decode_lease_batch(header, body, len(chunk))
        except KVStoreCorruptError:
            self._drop_connection()  # leases we cannot name: the node drops them with it
            raise
        release: list[_Buffer] = [requests.release_batch(reply.batch_id)]
        deferred: list[int] = []
        errors: list[KVStoreError] = []
        try:
            leased: list[tuple[int, int, int, memoryview]] = []  # index, offset, size, target
            for j, i in enumerate(chunk):
                tier = reply.tiers[j]
                if tier == 0:
                    continue
                if tier == LEASE_DEFERRED:
                    deferred.append(i)
                    continue
                offset, nbytes = reply.spans[j]
                size = nbytes - BLOCK_HEADER_BYTES
                target = targets[i]
                if size < 0:
                    errors.append(KVStoreCorruptError(f"lease of {nbytes} bytes has no header"))
                elif target is None:
                    leased.append((i, offset, size, memoryview(bytearray(size))))
                elif size > target.nbytes:
                    errors.append(replies.block_too_large(size, target.nbytes))
                else:
                    leased.append((i, offset, size, target[:size]))
            try:
                mapped = memory.mapped()
                if mapped is not None:
                    self._copy_mapped(mapped, leased, keys, results, errors)
                else:
                    self._copy_remote(memory, leased, keys, results, errors)
            except (OSError, ValueError) as exc:
                errors.insert(0, KVStoreError(f"cannot read from the node's arena: {exc}"))
        except BaseException:
            self._sendall(sock, release)
            raise
        if errors:
            self._sendall(sock, release)
            raise errors[0]
        return deferred, release

    @staticmethod
    def _copy_mapped(
        arena: memoryview,
        leased: list[tuple[int, int, int, memoryview]],
        keys: Sequence[bytes],
        results: list[memoryview | None],
        errors: list[KVStoreError],
    ) -> None:
        """Copy leased blocks out of a mapped arena, checking each while it is in the cache.

        The header is read in place (the node parsed it when the block was stored; only what this
        read depends on is checked: magic, key, length, checksum -- a full decode per block costs
        as much as checksumming a 256 KiB payload).
        """
        limit = arena.nbytes
        for i, offset, size, payload in leased:
            end = offset + BLOCK_HEADER_BYTES + size
            if offset < 0 or end > limit:
                raise ValueError(f"lease [{offset}, {end}) outside the arena")
            magic, key, nbytes, digest = _ARENA_HEADER.unpack_from(arena, offset)
            if magic != BLOCK_MAGIC or key != keys[i] or nbytes != size:
                errors.append(KVStoreCorruptError(f"lease for {keys[i].hex()} names another"))
                continue
            if _copy_and_hash(payload, arena[offset + BLOCK_HEADER_BYTES : end]) != digest:
                errors.append(replies.corrupt_block(keys[i]))
            else:
                results[i] = payload

    @staticmethod
    def _copy_remote(
        memory: RemoteMemory,
        leased: list[tuple[int, int, int, memoryview]],
        keys: Sequence[bytes],
        results: list[memoryview | None],
        errors: list[KVStoreError],
    ) -> None:
        """Copy leased blocks through a transport that cannot map the arena (RDMA)."""
        headers = memoryview(bytearray(BLOCK_HEADER_BYTES * len(leased)))
        spans: list[tuple[int, memoryview]] = []
        for n, (_i, offset, _size, payload) in enumerate(leased):
            spans.append((offset, headers[n * BLOCK_HEADER_BYTES : (n + 1) * BLOCK_HEADER_BYTES]))
            spans.append((offset + BLOCK_HEADER_BYTES, payload))

        def check(span: int) -> None:
            if span % 2 == 0:
                return  # a header; checked with its payload
            i, _offset, size, payload = leased[span // 2]
            block_header = spans[span - 1][1]
            magic, key, nbytes, digest = _ARENA_HEADER.unpack_from(block_header)
            if magic != BLOCK_MAGIC or key != keys[i] or nbytes != size:
                errors.append(KVStoreCorruptError(f"lease for {keys[i].hex()} names another"))
            elif checksum(payload) != digest:
                errors.append(replies.corrupt_block(keys[i]))
            else:
                results[i] = payload

        memory.read_into(spans, check)

    def _reserve_put(self, sock: socket.socket, prepared: Sequence[_PutItem]) -> list[PutStatus]:
        """PUTs through the one-sided transport: RESERVE_BATCH, copy in, COMMIT_BATCH.

        Pipelined two chunks deep: the requests go out as RESERVE 0, RESERVE 1, COMMIT 0,
        RESERVE 2, COMMIT 1, ... so that the client copies chunk k+1 while the node verifies
        chunk k. A chunk the node will not reserve (``FULL`` for the whole batch) is sent as
        ordinary PUT frames in its place in the stream.
        """
        chunks = _put_chunks(prepared)
        statuses: list[list[int]] = [[] for _ in chunks]
        errors: list[KVStoreError] = []
        # (op, chunk index, index in the chunk for a PUT frame, request id)
        in_flight: deque[tuple[Op, int, int, int]] = deque()
        next_chunk = 0

        def reserve_next() -> None:
            nonlocal next_chunk
            if next_chunk < len(chunks):
                chunk = chunks[next_chunk]
                rid = next(self._ids) & 0xFFFFFFFF
                blocks = [(item.key, BLOCK_HEADER_BYTES + item.view.nbytes) for item in chunk]
                self._sendall(sock, [requests.reserve_batch(rid, blocks)])
                in_flight.append((Op.RESERVE_BATCH, next_chunk, 0, rid))
                next_chunk += 1

        reserve_next()
        reserve_next()
        while in_flight:
            op, k, _index, request_id = in_flight.popleft()
            header = self._read_header(sock, request_id)
            body = self._recv_body(sock, header)
            if op is Op.PUT:
                statuses[k].append(header.status)
            elif op is Op.COMMIT_BATCH:
                if header.status != Status.OK or len(body) != len(chunks[k]):
                    errors.append(KVStoreError(f"COMMIT_BATCH failed (status {header.status})"))
                    statuses[k] = [Status.BAD_REQUEST] * len(chunks[k])
                else:
                    statuses[k] = list(body)
            elif header.status == Status.FULL:
                # The node will not reserve this much at once: stream it (one block at a time).
                for index, item in enumerate(chunks[k]):
                    request_id = self._send_put(sock, item.block_header(), item.view)
                    in_flight.append((Op.PUT, k, index, request_id))
                reserve_next()
            elif header.status != Status.OK:
                errors.append(KVStoreError(f"RESERVE_BATCH failed (status {header.status})"))
                statuses[k] = [Status.BAD_REQUEST] * len(chunks[k])
                reserve_next()
            else:
                batch_id = self._write_reserved(chunks[k], body)
                in_flight.append((Op.COMMIT_BATCH, k, 0, self._send_commit(sock, batch_id)))
                reserve_next()
        results: list[PutStatus] = []
        for chunk_statuses in statuses:
            for status in chunk_statuses:
                try:
                    results.append(replies.put_status(status))
                except KVStoreError as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]
        return results

    def _send_commit(self, sock: socket.socket, batch_id: int) -> int:
        request_id = next(self._ids) & 0xFFFFFFFF
        self._sendall(sock, [requests.commit_batch(request_id, batch_id)])
        return request_id

    def _write_reserved(self, chunk: Sequence[_PutItem], body: bytearray) -> int:
        """Write a reserved chunk's blocks into the arena; returns its batch id.

        Each block's header is computed right before its copy: hashing the caller's buffer
        brings it into the CPU cache, so the copy then reads it from there.
        """
        memory = self._memory
        assert memory is not None
        try:
            reply = replies.decode_reserve_batch(body, len(chunk))
        except KVStoreCorruptError:
            self._drop_connection()  # reservations we cannot name: the node revokes them with it
            raise
        try:
            for j, item in enumerate(chunk):
                if reply.statuses[j] == Status.OK:
                    header = memoryview(item.block_header())
                    memory.write_from([(reply.offsets[j], (header, item.view))])
        except (OSError, ValueError) as exc:
            self._drop_connection()  # the node revokes this connection's reservations
            raise KVStoreError(f"cannot write into the node's arena: {exc}") from exc
        # Blocks the node did not reserve keep their status (EXISTS, FULL, ...) through COMMIT.
        return reply.batch_id

    def _tcp_put_many(self, sock: socket.socket, prepared: Sequence[_PutItem]) -> list[PutStatus]:
        return self._pipeline(
            sock,
            len(prepared),
            lambda i: self._send_put(sock, prepared[i].block_header(), prepared[i].view),
            lambda i, rid: self._read_put_response(sock, rid),
        )


def _copy_and_hash(target: memoryview, source: memoryview) -> int:
    """Copy ``source`` into ``target`` and return its xxh3_64 (the block checksum).

    Piece by piece for large blocks, so that each piece is hashed while it is still in the
    CPU cache: a 2 MiB block copied whole and then hashed is read from memory twice (~15 %
    slower here).
    """
    nbytes = source.nbytes
    if nbytes <= _HASH_PIECE_BYTES:
        target[:] = source
        return checksum(target)
    digest = xxhash.xxh3_64()
    for start in range(0, nbytes, _HASH_PIECE_BYTES):
        piece = target[start : start + _HASH_PIECE_BYTES]
        piece[:] = source[start : start + _HASH_PIECE_BYTES]
        digest.update(piece)
    return digest.intdigest()


@dataclass(slots=True)
class _PutItem:
    """A block to store; its header (which checksums the payload) is computed when needed."""

    key: bytes
    view: memoryview
    header: bytes | None = None

    def block_header(self) -> bytes:
        if self.header is None:
            self.header = encode_header(self.key, self.view)
        return self.header


def _put_chunks(prepared: Sequence[_PutItem]) -> list[Sequence[_PutItem]]:
    """Split puts into RESERVE_BATCH chunks of at most RESERVE_BATCH_BLOCKS blocks and
    RESERVE_BATCH_BYTES bytes (a larger block gets a chunk of its own)."""
    chunks: list[Sequence[_PutItem]] = []
    start = 0
    while start < len(prepared):
        end, nbytes = start, 0
        while end < len(prepared) and end - start < RESERVE_BATCH_BLOCKS:
            size = BLOCK_HEADER_BYTES + prepared[end].view.nbytes
            if end > start and nbytes + size > RESERVE_BATCH_BYTES:
                break
            nbytes += size
            end += 1
        chunks.append(prepared[start:end])
        start = end
    return chunks
