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
    * :class:`KVStoreCorruptError` without keys: a reply claimed more than any reply to its
      request can carry (:func:`kvstore.wire.replies.reply_limit`: a count beyond what was asked,
      a block beyond ``max_block_bytes``); nothing is allocated for it and the connection is
      dropped.
    * :class:`KVStoreCorruptError`: a block failed its checksum or named another key -- twice: a
      GET whose block fails verification fetches it once more (a transfer error does not
      repeat; the call then succeeds), and if the second copy fails too the node's copy is
      damaged, so the client DELETEs it (later readers miss and the next writer stores it again)
      and raises. Raised, not reported as a miss, so that corruption is seen and counted
      (``corrupt_reads``) rather than silently recomputed; it subclasses :class:`KVStoreError`,
      so a caller that treats every store error as a miss still works. The connection stays
      usable (the frame was read completely).
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

import contextlib
import itertools
import logging
import socket
import ssl
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from kvstore.blocks.format import (
    BLOCK_HEADER_BYTES,
    BlockDType,
    BlockHeader,
    encode_header,
    verify,
)
from kvstore.blocks.tier import Tier
from kvstore.client.onesided import OneSidedPaths, PutItem
from kvstore.errors import (
    KVStoreAuthError,
    KVStoreConnectionLost,
    KVStoreCorruptError,
    KVStoreError,
    KVStoreTimeout,
    KVStoreUnavailable,
)
from kvstore.transport import tcp
from kvstore.transport.base import (
    DEFAULT_PREFERENCE,
    RemoteMemory,
    SkippedTransport,
    TransportKind,
    select_transport,
)
from kvstore.transport.tcp import recv_exact
from kvstore.wire import replies, requests
from kvstore.wire.frame import (
    DEFAULT_MAX_BLOCK_BYTES,
    FRAME_HEADER_BYTES,
    FrameHeader,
    Op,
    Status,
)
from kvstore.wire.messages import SHM_LEASE
from kvstore.wire.types import NodeMatch, PutStatus
from strata_common.closing import Closeable
from strata_common.credentials import ClusterCredentials, CredentialError
from strata_common.endpoints import parse_endpoint

__all__ = ["KVStoreClient"]

logger = logging.getLogger(__name__)

PIPELINE_WINDOW = 32
"""Requests kept in flight by the batch methods (bounded: see "Batches" above)."""

_T = TypeVar("_T")
_Buffer = bytes | bytearray | memoryview


class _ConnectionBroken(Exception):
    """Internal: the socket failed; the call may be retried on a new connection."""


def _nbytes(view: memoryview | None) -> int | None:
    return None if view is None else view.nbytes


class KVStoreClient(OneSidedPaths, Closeable):
    """Blocking, thread-safe client of one store node at ``endpoint`` (``"host:port"``).

    Connects lazily on first use, so constructing a client never fails because the node is down.
    ``transports`` is the order in which data paths are tried (TCP always ends it). A block
    larger than ``max_block_bytes`` (header + data; the node's default limit) is never read.
    """

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 10.0,
        *,
        use_shm: bool = True,
        transports: Sequence[TransportKind] = DEFAULT_PREFERENCE,
        credentials: ClusterCredentials | None = None,
        max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_block_bytes < BLOCK_HEADER_BYTES:
            raise ValueError("max_block_bytes must be at least the 64-byte block header")
        self.max_block_bytes = max_block_bytes
        self._preference = tuple(
            TransportKind(k) for k in transports if use_shm or k != TransportKind.SHM
        )
        self._memory: RemoteMemory | None = None
        self._kind = TransportKind.TCP
        self.skipped_transports: tuple[SkippedTransport, ...] = ()
        """Data paths tried on the last connect and not used, with the reasons."""
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._credentials = credentials
        endpoint_ = parse_endpoint(endpoint)
        self._address = (endpoint_.host, endpoint_.port)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._frame_header = bytearray(FRAME_HEADER_BYTES)
        self._block_header = bytearray(BLOCK_HEADER_BYTES)
        self.corrupt_reads = 0
        """Blocks that failed verification on this client (each refetch and each drop counts)."""

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
        item = PutItem(key, view, encode_header(key, view, dtype, shape))  # validates the shape

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
            prepared.append(PutItem(key, requests.as_bytes_view(data)))

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
            view = self._tcp_get_view(sock, key, self._send_get(sock, key), None)
            return None if view is None else bytes(view)

        return self._verified_call(run)

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

        return self._verified_call(run)

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
                Op.GET,
                len(keys),
                lambda i: self._send_get(sock, keys[i]),
                lambda i, rid: self._read_get_into(sock, keys[i], rid, targets[i]),
            )

        return self._verified_call(run)

    def match_prefix(self, keys: Sequence[bytes], *, hint: str | None = None) -> int:
        """Number of leading keys of a prompt's key chain that the node can serve (any tier, or
        live peers'); ``hint``: the node id holding them (docs/design/kvstore.md §10.9)."""
        return self.match_prefix_tiers(keys, hint=hint).depth

    def match_prefix_tiers(self, keys: Sequence[bytes], *, hint: str | None = None) -> NodeMatch:
        """:meth:`match_prefix` with the tier of each matched block (DRAM or SSD).

        A node without tier information (an older node) reports every block as DRAM.
        """
        requests.check_hint(hint)
        tiers: list[Tier] = []
        for chunk in requests.key_chunks(keys):
            found = replies.decode_match_tiers(
                *self._keyed(Op.MATCH_PREFIX, chunk, hint), len(chunk)
            )
            tiers.extend(found)
            if len(found) < len(chunk):
                break
        return NodeMatch(len(tiers), tuple(tiers))

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is stored (committed) on the node, in any tier."""
        present: list[bool] = []
        for chunk in requests.key_chunks(keys):
            present.extend(replies.decode_exists(*self._keyed(Op.EXISTS, chunk), len(chunk)))
        return present

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove blocks; returns how many were present."""
        return sum(
            replies.decode_delete(self._keyed(Op.DELETE, chunk)[0], len(chunk))
            for chunk in requests.key_chunks(keys)
        )

    def stats(self) -> dict[str, Any]:
        """The node's counters and occupancy (see kvstore.node.store.NodeStats)."""
        return self._call(lambda sock: self._json_request(sock, Op.STATS))

    def close(self) -> None:
        """Close the connection and unmap the arena. The client can be used again afterwards."""
        with self._lock:
            self._drop_connection()

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

    def _verified_call(self, fn: Callable[[socket.socket], _T]) -> _T:
        """A GET call: a block that fails verification is fetched again once (a transfer error
        does not repeat); if it fails again the stored copy is damaged and is deleted from the
        node (best effort) before the error is raised, so later readers miss instead."""
        try:
            return self._call(fn)
        except KVStoreCorruptError as exc:
            if not exc.keys:
                raise
            self.corrupt_reads += 1
            logger.warning("%s from %s; fetching it again", exc, self.endpoint)
        try:
            return self._call(fn)
        except KVStoreCorruptError as exc:
            if exc.keys:
                self.corrupt_reads += 1
                logger.warning("%s again: deleting it from %s", exc, self.endpoint)
                with contextlib.suppress(KVStoreError):
                    self.delete(exc.keys)
            raise

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        try:
            sock = socket.create_connection(self._address, timeout=self.timeout_s)
        except OSError as exc:
            raise KVStoreUnavailable(f"cannot connect to {self.endpoint}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:  # TLS mode: the node's certificate must name a store node
            sock = tcp.secure(sock, self._address[0], self._credentials)
        except CredentialError as exc:
            raise KVStoreAuthError(f"kvstore node {self.endpoint}: {exc}") from None
        except TimeoutError as exc:
            raise KVStoreTimeout(f"kvstore node {self.endpoint}: TLS handshake") from exc
        except OSError as exc:  # ssl.SSLError: refused certificates, a plaintext node
            raise KVStoreAuthError(f"kvstore node {self.endpoint}: TLS: {exc}") from exc
        self._sock = sock
        if self._credentials is not None:
            try:
                self._hello(sock, self._credentials)
            except _ConnectionBroken as exc:
                self._drop_connection()
                raise KVStoreConnectionLost(f"kvstore node {self.endpoint}: {exc}") from exc
            except KVStoreError:
                self._drop_connection()
                raise
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

    def _hello(self, sock: socket.socket, credentials: ClusterCredentials) -> None:
        """The HELLO handshake (kvstore.wire.hello): prove the cluster key, check the node's."""
        request_id = next(self._ids) & 0x7FFFFFFF
        next(self._ids)  # the handshake's second request
        try:
            tcp.hello(sock, credentials, request_id)
        except TimeoutError as exc:
            raise KVStoreTimeout(f"kvstore node {self.endpoint}: no HELLO reply") from exc
        except OSError as exc:
            raise _ConnectionBroken(f"HELLO failed: {exc}") from exc

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
        op: Op,
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
                self._drain(sock, [rid for _, rid in in_flight], op)
                raise
        return results

    def _drain(
        self, sock: socket.socket, request_ids: Iterable[int], op: Op, asked: int = 1
    ) -> None:
        """Read and discard the replies of requests of ``op`` (with ``asked`` keys at most) in
        flight; release any leases they grant."""
        try:
            for request_id in request_ids:
                header = self._read_header(sock, request_id, op, asked)
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
            if isinstance(sock, ssl.SSLSocket):  # TLS has no gathered send
                for view in views:
                    sock.sendall(view)
                views = []
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

    def _read_header(
        self, sock: socket.socket, request_id: int, op: Op, asked: int = 1
    ) -> FrameHeader:
        """The header of the reply to ``request_id``, a request of ``op`` with ``asked`` keys
        (checked against what such a reply can carry before its payload is read)."""
        self._recv_exact(sock, memoryview(self._frame_header))
        try:
            return replies.decode_reply_header(
                self._frame_header,
                0,
                request_id,
                op,
                max_block_bytes=self.max_block_bytes,
                asked=asked,
            )
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
        header = self._read_header(sock, request_id, Op.PUT)
        self._skip(sock, header.payload_len)
        return replies.put_status(header.status)

    def _read_get_header(
        self, sock: socket.socket, key: bytes, request_id: int
    ) -> BlockHeader | None:
        header = self._read_header(sock, request_id, Op.GET)
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

    def _tcp_get_view(
        self, sock: socket.socket, key: bytes, request_id: int, target: memoryview | None
    ) -> memoryview | None:
        """A GET reply's payload, received into ``target`` or (None) a new buffer of its size."""
        block = self._read_get_header(sock, key, request_id)
        if block is None:
            return None
        out = memoryview(bytearray(block.payload_nbytes)) if target is None else target
        return out[: self._recv_payload(sock, block, out)]

    def _keyed(
        self, op: Op, keys: Sequence[bytes], hint: str | None = None
    ) -> tuple[FrameHeader, bytearray]:
        """One MATCH_PREFIX (with its ``hint``), EXISTS or DELETE round trip: the reply's
        header and body."""

        def run(sock: socket.socket) -> tuple[FrameHeader, bytearray]:
            request_id = next(self._ids) & 0xFFFFFFFF
            self._sendall(sock, requests.keyed(op, request_id, keys, hint))
            header = self._read_header(sock, request_id, op, len(keys))
            body = self._recv_body(sock, header)
            replies.check_ok(header)
            return header, body

        return self._call(run)

    def _json_request(self, sock: socket.socket, op: Op) -> dict[str, Any]:
        request_id = next(self._ids) & 0xFFFFFFFF
        self._sendall(sock, [requests.empty(op, request_id)])
        header = self._read_header(sock, request_id, op)
        return replies.decode_json(header, self._recv_body(sock, header))

    def _tcp_put_many(self, sock: socket.socket, prepared: Sequence[PutItem]) -> list[PutStatus]:
        return self._pipeline(
            sock,
            Op.PUT,
            len(prepared),
            lambda i: self._send_put(sock, prepared[i].block_header(), prepared[i].view),
            lambda i, rid: self._read_put_response(sock, rid),
        )
