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

Shared-memory fast path
    When the node runs on the same host (checked by the arena file's device, inode and the kernel
    boot id, not by the address), the client maps the node's arena file read-only and a GET
    becomes: ask for a lease (offset, length), copy the block out of the mapping at memory speed,
    verify it, release the lease. Anything unexpected falls back to TCP for good. Disable it with
    ``use_shm=False``.
"""

from __future__ import annotations

import itertools
import json
import logging
import mmap
import os
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from kvstore.block import (
    BLOCK_HEADER_BYTES,
    BlockDType,
    BlockFormatError,
    BlockHeader,
    encode_header,
    verify,
)
from kvstore.events import Tier
from kvstore.node import PutStatus
from kvstore.protocol import (
    FRAME_HEADER_BYTES,
    KEY_BYTES,
    LEASE_ID,
    MAX_KEYS_PER_FRAME,
    SHM_LEASE,
    FrameError,
    FrameHeader,
    Op,
    Status,
    decode_bitmap,
    pack_frame_header,
)

__all__ = [
    "KVStoreClient",
    "KVStoreCorruptError",
    "KVStoreError",
    "KVStoreUnavailable",
    "PrefixMatch",
    "PutStatus",
    "Tier",
]

logger = logging.getLogger(__name__)

PIPELINE_WINDOW = 32
"""Requests kept in flight by the batch methods (bounded: see "Batches" above)."""

_T = TypeVar("_T")
_Buffer = bytes | bytearray | memoryview


class KVStoreError(Exception):
    """Base of every error the client raises."""


class KVStoreUnavailable(KVStoreError):
    """The node cannot be reached or stopped answering; treat as a miss and recompute."""


class KVStoreCorruptError(KVStoreError):
    """A block read from the node failed its checksum or is not the block asked for."""


class _ConnectionBroken(Exception):
    """Internal: the socket failed; the call may be retried on a new connection."""


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """How much of a key chain a node holds, and where: ``tiers[i]`` is the fastest tier holding
    key ``i`` of the matched prefix (``depth`` keys)."""

    depth: int
    tiers: tuple[Tier, ...]

    def num_in(self, tier: Tier) -> int:
        """Matched blocks whose fastest copy is in ``tier`` (e.g. to price loading them)."""
        return sum(1 for t in self.tiers if t is tier)


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"endpoint must be HOST:PORT, got {endpoint!r}")
    return host.strip("[]"), int(port)


def _as_bytes_view(data: _Buffer) -> memoryview:
    view = memoryview(data)
    if not view.contiguous:
        raise ValueError("block buffers must be contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _nbytes(view: memoryview | None) -> int | None:
    return None if view is None else view.nbytes


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"block keys are {KEY_BYTES} bytes, got {len(key)}")


class KVStoreClient:
    """Blocking, thread-safe client of one store node at ``endpoint`` (``"host:port"``).

    Connects lazily on first use, so constructing a client never fails because the node is down.
    """

    def __init__(self, endpoint: str, timeout_s: float = 10.0, *, use_shm: bool = True) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._address = _parse_endpoint(endpoint)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._frame_header = bytearray(FRAME_HEADER_BYTES)
        self._block_header = bytearray(BLOCK_HEADER_BYTES)
        self._want_shm = use_shm
        self._shm: mmap.mmap | None = None
        self._shm_view: memoryview | None = None

    # -- public API -------------------------------------------------------------------------------

    @property
    def transport(self) -> str:
        """``"shm"`` if GETs use the shared-memory path, else ``"tcp"`` (after connecting)."""
        return "shm" if self._shm_view is not None else "tcp"

    def put(
        self,
        key: bytes,
        data: _Buffer,
        *,
        dtype: BlockDType = BlockDType.RAW,
        shape: Sequence[int] | None = None,
    ) -> PutStatus:
        """Store ``data`` under ``key``: OK, EXISTS (already there; unchanged) or FULL (refused)."""
        _check_key(key)
        view = _as_bytes_view(data)
        block_header = encode_header(key, view, dtype, shape)

        def run(sock: socket.socket) -> PutStatus:
            request_id = self._send_put(sock, block_header, view)
            return self._read_put_response(sock, request_id)

        return self._call(run)

    def put_many(self, items: Sequence[tuple[bytes, _Buffer]]) -> list[PutStatus]:
        """Store several blocks, pipelined; returns one status per item, in order."""
        prepared = []
        for key, data in items:
            _check_key(key)
            view = _as_bytes_view(data)
            prepared.append((encode_header(key, view), view))

        def run(sock: socket.socket) -> list[PutStatus]:
            return self._pipeline(
                sock,
                len(prepared),
                lambda i: self._send_put(sock, *prepared[i]),
                lambda i, rid: self._read_put_response(sock, rid),
            )

        return self._call(run)

    def get(self, key: bytes) -> bytes | None:
        """Return the block's payload, or None on a miss. Copies once more than :meth:`get_into`."""
        _check_key(key)

        def run(sock: socket.socket) -> bytes | None:
            if self._shm_view is not None:
                request_id = self._send(sock, Op.GET_SHM, 1, key)
                copied = self._copy_shm(sock, key, request_id, None)
                return None if copied is None else bytes(copied)
            request_id = self._send(sock, Op.GET, 1, key)
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
        _check_key(key)
        target = _as_bytes_view(out)
        if target.readonly:
            raise ValueError("out must be writable")

        def run(sock: socket.socket) -> int | None:
            if self._shm_view is not None:
                request_id = self._send(sock, Op.GET_SHM, 1, key)
                return _nbytes(self._copy_shm(sock, key, request_id, target))
            request_id = self._send(sock, Op.GET, 1, key)
            return self._read_get_into(sock, key, request_id, target)

        return self._call(run)

    def get_many_into(self, keys: Sequence[bytes], outs: Sequence[_Buffer]) -> list[int | None]:
        """:meth:`get_into` for many blocks, pipelined; one result per key, in order."""
        if len(keys) != len(outs):
            raise ValueError("keys and outs differ in length")
        targets = []
        for key, out in zip(keys, outs, strict=True):
            _check_key(key)
            target = _as_bytes_view(out)
            if target.readonly:
                raise ValueError("outs must be writable")
            targets.append(target)

        def run(sock: socket.socket) -> list[int | None]:
            if self._shm_view is not None:
                return self._pipeline(
                    sock,
                    len(keys),
                    lambda i: self._send(sock, Op.GET_SHM, 1, keys[i]),
                    lambda i, rid: _nbytes(self._copy_shm(sock, keys[i], rid, targets[i])),
                )
            return self._pipeline(
                sock,
                len(keys),
                lambda i: self._send(sock, Op.GET, 1, keys[i]),
                lambda i, rid: self._read_get_into(sock, keys[i], rid, targets[i]),
            )

        return self._call(run)

    def match_prefix(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys of a prompt's key chain that the node holds (any tier)."""
        matched = 0
        for chunk in self._key_chunks(keys):
            found = self._keyed(Op.MATCH_PREFIX, chunk)[0]
            matched += found
            if found < len(chunk):
                break
        return matched

    def match_prefix_tiers(self, keys: Sequence[bytes]) -> PrefixMatch:
        """:meth:`match_prefix` with the tier of each matched block (DRAM or SSD).

        A node without tier information (an older node) reports every block as DRAM.
        """
        tiers: list[Tier] = []
        for chunk in self._key_chunks(keys):
            found, body = self._keyed(Op.MATCH_PREFIX, chunk)
            try:
                codes = [Tier(code) for code in body] if len(body) == found else None
            except ValueError:
                codes = None
            tiers.extend(codes if codes is not None else [Tier.DRAM] * found)
            if found < len(chunk):
                break
        return PrefixMatch(len(tiers), tuple(tiers))

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is stored (committed) on the node, in any tier."""
        present: list[bool] = []
        for chunk in self._key_chunks(keys):
            count, bitmap = self._keyed(Op.EXISTS, chunk)
            present.extend(decode_bitmap(bitmap, count))
        return present

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove blocks; returns how many were present."""
        return sum(self._keyed(Op.DELETE, chunk)[0] for chunk in self._key_chunks(keys))

    def stats(self) -> dict[str, Any]:
        """The node's counters and occupancy (see kvstore.node.NodeStats)."""
        return self._json_call(Op.STATS)

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
                    raise KVStoreUnavailable(f"kvstore node {self.endpoint}: {exc}") from exc
                logger.info("connection to %s broke (%s); reconnecting once", self.endpoint, exc)
            sock = self._connect()
            try:
                return fn(sock)
            except _ConnectionBroken as exc:
                self._drop_connection()
                raise KVStoreUnavailable(f"kvstore node {self.endpoint}: {exc}") from exc

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        try:
            sock = socket.create_connection(self._address, timeout=self.timeout_s)
        except OSError as exc:
            raise KVStoreUnavailable(f"cannot connect to {self.endpoint}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        if self._want_shm and self._shm is None:
            try:
                self._attach_shm(sock)
            except _ConnectionBroken as exc:
                self._drop_connection()
                raise KVStoreUnavailable(f"kvstore node {self.endpoint}: {exc}") from exc
        return sock

    def _drop_connection(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
        if self._shm_view is not None:
            self._shm_view.release()
            self._shm_view = None
        if self._shm is not None:
            self._shm.close()
            self._shm = None

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

    def _drain(self, sock: socket.socket, in_flight: deque[tuple[int, int]]) -> None:
        """Read and discard the replies of requests in flight; release any leases they grant."""
        try:
            for _index, request_id in in_flight:
                header = self._read_header(sock, request_id)
                if header.opcode is Op.GET_SHM and header.status == Status.OK:
                    body = bytearray(header.payload_len)
                    self._recv_exact(sock, memoryview(body))
                    lease_id = SHM_LEASE.unpack(body)[0]
                    self._send(sock, Op.RELEASE, 1, LEASE_ID.pack(lease_id))
                else:
                    self._skip(sock, header.payload_len)
        except (KVStoreError, _ConnectionBroken, struct.error):
            self._drop_connection()  # the node releases whatever this connection held

    # -- framing ----------------------------------------------------------------------------------

    def _send(self, sock: socket.socket, op: Op, count: int, *payload: _Buffer) -> int:
        request_id = next(self._ids) & 0xFFFFFFFF
        length = sum(memoryview(p).nbytes for p in payload)
        self._sendall(sock, [pack_frame_header(op, request_id, count, length), *payload])
        return request_id

    def _send_put(self, sock: socket.socket, block_header: bytes, data: memoryview) -> int:
        return self._send(sock, Op.PUT, 1, block_header, data)

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
            raise KVStoreUnavailable(f"kvstore node {self.endpoint}: send timed out") from exc
        except OSError as exc:
            raise _ConnectionBroken(f"send failed: {exc}") from exc

    def _recv_exact(self, sock: socket.socket, target: memoryview) -> None:
        try:
            while target.nbytes:
                received = sock.recv_into(target)
                if not received:
                    raise _ConnectionBroken("connection closed by the node")
                target = target[received:]
        except TimeoutError as exc:
            self._drop_connection()
            raise KVStoreUnavailable(
                f"kvstore node {self.endpoint}: no reply within {self.timeout_s:g}s"
            ) from exc
        except OSError as exc:
            raise _ConnectionBroken(f"receive failed: {exc}") from exc

    def _read_header(self, sock: socket.socket, request_id: int) -> FrameHeader:
        self._recv_exact(sock, memoryview(self._frame_header))
        try:
            header = FrameHeader.decode(self._frame_header)
        except FrameError as exc:
            self._drop_connection()
            raise KVStoreError(f"garbled reply from {self.endpoint}: {exc}") from exc
        if header.request_id != request_id:
            self._drop_connection()
            raise KVStoreError(
                f"reply for request {header.request_id} while waiting for {request_id}"
            )
        return header

    def _skip(self, sock: socket.socket, nbytes: int) -> None:
        scratch = memoryview(bytearray(min(nbytes, 1 << 20)))
        while nbytes:
            step = min(nbytes, scratch.nbytes)
            self._recv_exact(sock, scratch[:step])
            nbytes -= step

    def _read_put_response(self, sock: socket.socket, request_id: int) -> PutStatus:
        header = self._read_header(sock, request_id)
        status = header.status
        if status in (Status.OK, Status.EXISTS, Status.FULL):
            return PutStatus(status)
        if status == Status.CORRUPT:
            raise KVStoreCorruptError("the node received a block that failed its checksum")
        if status == Status.TOO_LARGE:
            raise KVStoreError("block is larger than the node's max_block_bytes")
        raise KVStoreError(f"the node rejected the PUT (status {status})")

    def _read_get_header(
        self, sock: socket.socket, key: bytes, request_id: int
    ) -> BlockHeader | None:
        header = self._read_header(sock, request_id)
        if header.status == Status.MISS:
            return None
        if header.status != Status.OK or header.payload_len < BLOCK_HEADER_BYTES:
            self._skip(sock, header.payload_len)
            raise KVStoreError(f"unexpected GET reply (status {header.status})")
        self._recv_exact(sock, memoryview(self._block_header))
        try:
            block = BlockHeader.decode(self._block_header)
        except BlockFormatError as exc:
            self._skip(sock, header.payload_len - BLOCK_HEADER_BYTES)
            raise KVStoreCorruptError(f"bad block header from the node: {exc}") from exc
        if block.payload_nbytes != header.payload_len - BLOCK_HEADER_BYTES:
            self._drop_connection()
            raise KVStoreCorruptError("block header and frame disagree on the length")
        if block.key != key:
            self._skip(sock, block.payload_nbytes)
            raise KVStoreCorruptError(f"asked for {key.hex()}, got {block.key.hex()}")
        return block

    def _recv_payload(self, sock: socket.socket, block: BlockHeader, target: memoryview) -> int:
        nbytes = block.payload_nbytes
        if nbytes > target.nbytes:
            self._skip(sock, nbytes)
            raise KVStoreError(f"block of {nbytes} bytes does not fit in {target.nbytes} bytes")
        payload = target[:nbytes]
        self._recv_exact(sock, payload)
        if not verify(block, payload):
            raise KVStoreCorruptError(f"block {block.key.hex()} failed its checksum")
        return nbytes

    def _read_get_into(
        self, sock: socket.socket, key: bytes, request_id: int, target: memoryview
    ) -> int | None:
        block = self._read_get_header(sock, key, request_id)
        return None if block is None else self._recv_payload(sock, block, target)

    def _key_chunks(self, keys: Sequence[bytes]) -> list[Sequence[bytes]]:
        for key in keys:
            _check_key(key)
        return [keys[i : i + MAX_KEYS_PER_FRAME] for i in range(0, len(keys), MAX_KEYS_PER_FRAME)]

    def _keyed(self, op: Op, keys: Sequence[bytes]) -> tuple[int, bytes]:
        payload = b"".join(keys)

        def run(sock: socket.socket) -> tuple[int, bytes]:
            request_id = self._send(sock, op, len(keys), payload)
            header = self._read_header(sock, request_id)
            body = bytearray(header.payload_len)
            self._recv_exact(sock, memoryview(body))
            if header.status != Status.OK:
                raise KVStoreError(f"{op.name} failed (status {header.status})")
            return header.count, bytes(body)

        return self._call(run)

    def _json_call(self, op: Op) -> dict[str, Any]:
        def run(sock: socket.socket) -> dict[str, Any]:
            return self._json_request(sock, op)

        return self._call(run)

    def _json_request(self, sock: socket.socket, op: Op) -> dict[str, Any]:
        request_id = self._send(sock, op, 0)
        header = self._read_header(sock, request_id)
        body = bytearray(header.payload_len)
        self._recv_exact(sock, memoryview(body))
        if header.status != Status.OK:
            raise KVStoreError(f"{op.name} failed (status {header.status})")
        value = json.loads(body)
        if not isinstance(value, dict):
            raise KVStoreError(f"{op.name} reply is not a JSON object")
        return value

    # -- shared memory ----------------------------------------------------------------------------

    def _attach_shm(self, sock: socket.socket) -> None:
        """Map the node's arena if it is provably the same file on this host; else stay on TCP."""
        try:
            info = self._json_request(sock, Op.SHM_INFO)
        except KVStoreError as exc:
            logger.info("no shared-memory info from %s (%s); using TCP", self.endpoint, exc)
            self._want_shm = False
            return
        path = str(info.get("path", ""))
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot_id = f.read().strip()
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            self._want_shm = False
            return
        try:
            stat = os.fstat(fd)
            same_file = (
                boot_id
                and info.get("boot_id") == boot_id
                and info.get("device") == stat.st_dev
                and info.get("inode") == stat.st_ino
                and info.get("size") == stat.st_size
            )
            if not same_file:
                self._want_shm = False
                return
            self._shm = mmap.mmap(fd, stat.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as exc:
            logger.info("cannot map the arena of %s (%s); using TCP", self.endpoint, exc)
            self._want_shm = False
            return
        finally:
            os.close(fd)
        self._shm_view = memoryview(self._shm)
        logger.info("kvstore node %s is local: GETs use shared memory", self.endpoint)

    def _copy_shm(
        self, sock: socket.socket, key: bytes, request_id: int, target: memoryview | None
    ) -> memoryview | None:
        """Read a GET_SHM reply, copy the payload out of the mapped arena, release the lease.

        Copies into ``target`` (which must be large enough), or into a new buffer if it is None;
        returns the filled part, or None on a miss.
        """
        assert self._shm_view is not None
        header = self._read_header(sock, request_id)
        body = bytearray(header.payload_len)
        self._recv_exact(sock, memoryview(body))
        if header.status == Status.MISS:
            return None
        if header.status != Status.OK or len(body) != SHM_LEASE.size:
            raise KVStoreError(f"unexpected GET_SHM reply (status {header.status})")
        lease_id, offset, nbytes = SHM_LEASE.unpack(body)
        try:
            block_bytes = self._shm_view[offset : offset + nbytes]
            try:
                block = BlockHeader.decode(block_bytes)
            except BlockFormatError as exc:
                raise KVStoreCorruptError(f"bad block header in shared memory: {exc}") from exc
            if block.key != key or BLOCK_HEADER_BYTES + block.payload_nbytes != nbytes:
                raise KVStoreCorruptError(f"shm lease for {key.hex()} names another block")
            size = block.payload_nbytes
            if target is None:
                target = memoryview(bytearray(size))
            elif size > target.nbytes:
                raise KVStoreError(f"block of {size} bytes does not fit in {target.nbytes} bytes")
            payload = target[:size]
            payload[:] = block_bytes[BLOCK_HEADER_BYTES:]
        finally:
            # No reply to RELEASE: the copy above is all the lease protected.
            self._send(sock, Op.RELEASE, 1, LEASE_ID.pack(lease_id))
        if not verify(block, payload):
            raise KVStoreCorruptError(f"block {key.hex()} failed its checksum")
        return payload
