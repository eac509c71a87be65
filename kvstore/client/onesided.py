"""The one-sided data paths of :class:`~kvstore.client.sync.KVStoreClient` (shared memory, RDMA).

With a one-sided path a batch of GETs is one ``LEASE_BATCH`` round trip per ``LEASE_BATCH_KEYS``
keys (two batches in flight, so the next reply overlaps this copy), a copy out of the arena, a
checksum per block and one ``RELEASE_BATCH`` (no reply); a batch of PUTs is ``RESERVE_BATCH``
(the node's two-phase put), a copy into the arena and ``COMMIT_BATCH`` (the node verifies every
header). A batch the node will not reserve at once is sent over TCP instead. Mixed into the
client, whose connection (``_sendall``, ``_read_header``, ...) it uses.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import xxhash

from kvstore.blocks.format import (
    BLOCK_HEADER_BYTES,
    BLOCK_MAGIC,
    checksum,
    encode_header,
    header_seed,
)
from kvstore.errors import (
    KVStoreCorruptError,
    KVStoreError,
    KVStoreUnavailable,
)
from kvstore.transport.base import (
    RemoteMemory,
    TransportUnavailable,
)
from kvstore.transport.rdma import RdmaClientMemory, local_rdma
from kvstore.transport.shm import ShmMemory
from kvstore.wire import replies, requests
from kvstore.wire.frame import (
    FrameHeader,
    Op,
    Status,
)
from kvstore.wire.messages import LEASE_DEFERRED, LEASE_REFUSED, RdmaEndpointInfo
from kvstore.wire.types import PutStatus

__all__ = ["LEASE_BATCH_KEYS", "OneSidedPaths", "PutItem", "put_chunks"]

logger = logging.getLogger(__name__)

LEASE_BATCH_KEYS = 128
"""Keys per LEASE_BATCH round trip on a one-sided transport."""
_HASH_PIECE_BYTES = 256 * 1024
_ARENA_HEADER = struct.Struct("<4s4x16sQQ")
"""Magic, key, payload length and checksum of a block header (kvstore.blocks.format's layout)."""
RESERVE_BATCH_BLOCKS = 64
RESERVE_BATCH_BYTES = 16 * 1024 * 1024
"""Bounds of one RESERVE_BATCH (what one round trip reserves in the node's arena)."""

_Buffer = bytes | bytearray | memoryview
_T = TypeVar("_T")


class OneSidedPaths:
    """GETs and PUTs through a transport that maps (shm) or reaches (RDMA) the node's arena."""

    endpoint: str
    max_block_bytes: int
    _memory: RemoteMemory | None
    _ids: Iterator[int]

    if TYPE_CHECKING:  # the client's connection, which these paths share

        def _sendall(self, sock: socket.socket, parts: list[_Buffer]) -> None: ...

        def _read_header(
            self, sock: socket.socket, request_id: int, op: Op, asked: int = 1
        ) -> FrameHeader: ...

        def _recv_body(self, sock: socket.socket, header: FrameHeader) -> bytearray: ...

        def _drop_connection(self) -> None: ...

        def _drain(
            self, sock: socket.socket, request_ids: Iterable[int], op: Op, asked: int = 1
        ) -> None: ...

        def _send_get(self, sock: socket.socket, key: bytes) -> int: ...

        def _tcp_get_view(
            self, sock: socket.socket, key: bytes, request_id: int, target: memoryview | None
        ) -> memoryview | None: ...

        def _pipeline(
            self,
            sock: socket.socket,
            op: Op,
            count: int,
            send: Callable[[int], int],
            receive: Callable[[int, int], _T],
        ) -> list[_T]: ...

        def _send_put(self, sock: socket.socket, block_header: bytes, data: memoryview) -> int: ...

        def _json_request(self, sock: socket.socket, op: Op) -> dict[str, Any]: ...

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
            header = self._read_header(sock, request_id, Op.RDMA_CONNECT)
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
        Keys the node deferred are asked again in another round; keys it refused to lease (its
        cap on pinned arena space is reached) are read over TCP at the end.
        """
        results: list[memoryview | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        refused: list[int] = []
        while todo:  # deferred keys (on SSD, beyond the per-batch reads or our share) come back
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
                        sock, request_id, chunk, keys, targets, results, refused
                    )
                except KVStoreError:
                    rids = [rid for _, rid in in_flight]
                    self._drain(sock, rids, Op.LEASE_BATCH, LEASE_BATCH_KEYS)
                    raise
                todo += deferred
            if release:
                self._sendall(sock, release)
        if refused:
            views = self._pipeline(
                sock,
                Op.GET,
                len(refused),
                lambda n: self._send_get(sock, keys[refused[n]]),
                lambda n, rid: self._tcp_get_view(sock, keys[refused[n]], rid, targets[refused[n]]),
            )
            for i, view in zip(refused, views, strict=True):
                results[i] = view
        return results

    def _copy_leased(
        self,
        sock: socket.socket,
        request_id: int,
        chunk: list[int],
        keys: Sequence[bytes],
        targets: Sequence[memoryview | None],
        results: list[memoryview | None],
        refused: list[int],
    ) -> tuple[list[int], list[_Buffer]]:
        """Handle one LEASE_BATCH reply: copy and verify its blocks.

        Returns the indices the node deferred and the RELEASE_BATCH frame to send (and appends
        those it refused to ``refused``); on an error it sends that frame itself before raising.
        """
        memory = self._memory
        assert memory is not None
        header = self._read_header(sock, request_id, Op.LEASE_BATCH, len(chunk))
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
                if tier == LEASE_REFUSED:
                    refused.append(i)
                    continue
                offset, nbytes = reply.spans[j]
                size = nbytes - BLOCK_HEADER_BYTES
                target = targets[i]
                if size < 0 or nbytes > self.max_block_bytes:  # checked before allocating
                    errors.append(replies.corrupt_block(keys[i], f"leased as {nbytes} bytes"))
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
                errors.append(replies.corrupt_block(keys[i], "leased with another header"))
                continue
            seed = header_seed(arena[offset : offset + BLOCK_HEADER_BYTES])
            if _copy_and_hash(payload, arena[offset + BLOCK_HEADER_BYTES : end], seed) != digest:
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
                errors.append(replies.corrupt_block(keys[i], "leased with another header"))
            elif checksum(payload, header_seed(block_header)) != digest:
                errors.append(replies.corrupt_block(keys[i]))
            else:
                results[i] = payload

        memory.read_into(spans, check)

    def _reserve_put(self, sock: socket.socket, prepared: Sequence[PutItem]) -> list[PutStatus]:
        """PUTs through the one-sided transport: RESERVE_BATCH, copy in, COMMIT_BATCH.

        Pipelined two chunks deep: the requests go out as RESERVE 0, RESERVE 1, COMMIT 0,
        RESERVE 2, COMMIT 1, ... so that the client copies chunk k+1 while the node verifies
        chunk k. A chunk the node will not reserve (``FULL`` for the whole batch) is sent as
        ordinary PUT frames in its place in the stream.
        """
        chunks = put_chunks(prepared)
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
            asked = 1 if op is Op.PUT else len(chunks[k])
            header = self._read_header(sock, request_id, op, asked)
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

    def _write_reserved(self, chunk: Sequence[PutItem], body: bytearray) -> int:
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


def _copy_and_hash(target: memoryview, source: memoryview, seed: int) -> int:
    """Copy ``source`` into ``target`` and return its checksum (xxh3_64 seeded with the block's
    header seed, kvstore.blocks.format).

    Piece by piece for large blocks, so that each piece is hashed while it is still in the
    CPU cache: a 2 MiB block copied whole and then hashed is read from memory twice (~15 %
    slower here).
    """
    nbytes = source.nbytes
    if nbytes <= _HASH_PIECE_BYTES:
        target[:] = source
        return checksum(target, seed)
    digest = xxhash.xxh3_64(seed=seed)
    for start in range(0, nbytes, _HASH_PIECE_BYTES):
        piece = target[start : start + _HASH_PIECE_BYTES]
        piece[:] = source[start : start + _HASH_PIECE_BYTES]
        digest.update(piece)
    return digest.intdigest()


@dataclass(slots=True)
class PutItem:
    """A block to store; its header (which checksums the payload) is computed when needed."""

    key: bytes
    view: memoryview
    header: bytes | None = None

    def block_header(self) -> bytes:
        if self.header is None:
            self.header = encode_header(self.key, self.view)
        return self.header


def put_chunks(prepared: Sequence[PutItem]) -> list[Sequence[PutItem]]:
    """Split puts into RESERVE_BATCH chunks of at most RESERVE_BATCH_BLOCKS blocks and
    RESERVE_BATCH_BYTES bytes (a larger block gets a chunk of its own)."""
    chunks: list[Sequence[PutItem]] = []
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
