"""The store node server: the kvstore wire protocol over TCP, on uvloop.

Run it with ``python -m kvstore.server --host 127.0.0.1 --port 7600 --arena-size 2GiB``. It prints
``kvstore node listening on HOST:PORT`` on stdout once it accepts connections, and stops gracefully
(exit status 0, arena file removed) on SIGTERM or SIGINT.

Data path
    Each connection is an ``asyncio.BufferedProtocol``, not a stream reader: asyncio streams copy
    every chunk into a fresh ``bytes`` and run 2-4x slower here. Small frames are received into one
    preallocated 256 KiB buffer per connection and parsed in place. A PUT's payload is received
    *directly into the arena extent* reserved for it (``get_buffer`` returns a view of the extent),
    so a block crosses from the socket to the arena with the kernel's one copy. A GET writes a view
    of the arena (``writelines([header, view])``, one ``writev``) -- again no copy in Python.

Leases while sending
    uvloop keeps a reference to a view it could not send at once and finishes the send later. The
    GET handler therefore holds the block's read lease until the transport's write buffer is empty;
    until then eviction and delete cannot free (and a later PUT cannot overwrite) those bytes. The
    write-buffer high-water mark is 0, so ``pause_writing`` fires whenever a response is not fully
    handed to the kernel; the connection then also stops reading and parsing (back-pressure: a
    client that pipelines GETs without reading cannot make the node buffer unboundedly), and
    ``resume_writing`` releases the held leases and resumes.

SSD tier (docs/design/kvstore.md §13)
    With ``--ssd-dir`` the node has a second tier, managed by :class:`kvstore.tiers.TierManager`
    (spill above the high watermark, promotion on a hit, lookups across tiers). A GET that misses
    DRAM but hits SSD is read on a thread into an arena extent; meanwhile the connection keeps
    parsing and answering, queuing later responses behind the pending one (``_replies``), so
    responses stay in request order while several SSD reads run at once. A connection with
    ``MAX_FETCHES_PER_CONNECTION`` reads or ``MAX_QUEUED_REPLIES`` responses outstanding stops
    reading its socket until one completes. GET and GET_SHM responses carry the tier that served
    the block in ``count`` (1 = DRAM, 2 = SSD); MATCH_PREFIX responses carry one byte per matched
    key, the fastest tier holding it (older clients ignore both).

Transport ops (kvstore.transport, docs/design/kvstore.md §16)
    ``LEASE_BATCH`` pins a batch of blocks under one batch id and answers where each one is in
    the arena (SSD blocks are first read into the arena, the reply waiting in line like a GET's);
    ``RELEASE_BATCH`` unpins them. ``RESERVE_BATCH`` is the first phase of a batch of puts
    (space reserved, blocks invisible), the client writes the blocks into the arena itself, and
    ``COMMIT_BATCH`` verifies every block's checksum and header and commits it (or revokes it:
    ``CORRUPT``). A connection may hold at most ``MAX_SHM_LEASES_PER_CONNECTION`` leases and
    reserve at most a quarter of the arena at once: a bigger RESERVE_BATCH is refused whole
    (``FULL``, and the client sends those blocks over TCP, one reservation at a time); an open
    reservation counts as a payload in flight for the put timeout. ``RDMA_CONNECT`` connects a
    queue pair to the registered arena (kvstore.rdma) or answers ``UNSUPPORTED`` with the reason.

Failure handling
    A malformed frame (see kvstore.protocol) closes only its connection. A connection lost in the
    middle of a PUT revokes the reservation; one idle in the middle of a PUT for longer than
    ``put_timeout_s`` is aborted by a reaper so that a stalled writer cannot pin arena space.
    Leases of a lost connection (including shared-memory leases) are released. An unexpected
    exception in a handler is logged and closes that connection; the node keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import signal
import socket
import sys
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import uvloop

from kvstore.arena import Arena, remove_stale_arenas
from kvstore.block import BLOCK_HEADER_BYTES, BlockFormatError, BlockHeader, verify
from kvstore.cluster import FLAG_NO_FORWARD, ClusterView, PeerFetcher
from kvstore.config import StoreNodeConfig
from kvstore.events import Tier
from kvstore.membership import NodeAgent
from kvstore.metadata import EmbeddedMetadataStore, open_metadata_store
from kvstore.metadata.service import MetadataServer
from kvstore.node import Lease, PendingPut, PutStatus, StoreNode
from kvstore.policy import PolicyKind, make_policy
from kvstore.protocol import (
    BATCH_ID,
    FRAME_HEADER_BYTES,
    KEY_BYTES,
    LEASE_DEFERRED,
    LEASE_ID,
    RESERVE_ITEM,
    SHM_LEASE,
    FrameError,
    FrameHeader,
    LeaseBatchReply,
    Op,
    RdmaEndpointInfo,
    ReserveBatchReply,
    Status,
    encode_bitmap,
    pack_frame_header,
)
from kvstore.rdma import RdmaNodeEndpoint
from kvstore.ssd import SSDTier, SSDTierError, tune_malloc_for_lmdb
from kvstore.tiers import TierManager
from kvstore.transport import TransportKind, TransportUnavailable, log_unavailable_once
from strata_common.host import boot_id

__all__ = ["StoreServer", "main"]

logger = logging.getLogger("kvstore.server")

RECV_BUFFER_BYTES = 256 * 1024
MAX_SHM_LEASES_PER_CONNECTION = 4096
MAX_FETCHES_PER_CONNECTION = 8
"""SSD reads one connection may have in flight (the disk wants queue depth)."""
MAX_QUEUED_REPLIES = 64
"""Responses one connection may hold back behind pending SSD reads before it stops reading."""
MAX_SSD_READS_PER_BATCH = 8
"""SSD blocks one LEASE_BATCH reads into the arena (the rest are answered LEASE_DEFERRED)."""
MAX_RESERVED_FRACTION = 0.25
"""Share of the arena one connection may hold reserved by RESERVE_BATCH at once."""
_PUT_PREFIX = FRAME_HEADER_BYTES + BLOCK_HEADER_BYTES


@dataclass(slots=True)
class _Reserved:
    """One block of a RESERVE_BATCH: what was asked for and its reservation (None if refused)."""

    status: Status
    key: bytes
    nbytes: int
    pending: PendingPut | None


@dataclass(slots=True)
class TransferCounters:
    """What the transport ops moved (STATS ``transfers``): exact counts, for tests and ops."""

    lease_batches: int = 0
    batch_leased_blocks: int = 0
    reserve_batches: int = 0
    reserve_batches_refused: int = 0
    reserved_blocks: int = 0
    committed_blocks: int = 0
    corrupt_blocks: int = 0
    rdma_connections: int = 0


@dataclass(slots=True)
class _Reply:
    """A response waiting for an earlier one (an SSD read) so that order is kept."""

    parts: list[bytes | memoryview]
    lease: Lease | None = None  # released once the view has been handed to the kernel
    ready: bool = True


class _Connection(asyncio.BufferedProtocol):
    """One client connection: a frame parser feeding the node, with receive-into-arena for PUT."""

    def __init__(self, server: StoreServer) -> None:
        self._server = server
        self._node = server.node
        self._tiers = server.tiers
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._buf = bytearray(RECV_BUFFER_BYTES)
        self._view = memoryview(self._buf)
        self._start = 0  # first unparsed byte in _buf
        self._end = 0  # one past the last received byte in _buf
        # Direct-receive mode: the rest of a frame's payload goes straight into _sink.
        self._sink: memoryview | None = None
        self._sink_pos = 0
        self._on_sink_full: Callable[[], None] | None = None
        # Discard mode: drain a rejected PUT's payload, then answer with _discard_reply.
        self._discard_left = 0
        self._discard_reply = b""
        self._pending: PendingPut | None = None
        self._payload_started_at: float | None = None
        self._write_paused = False
        self._unsent_leases: list[Lease] = []
        self._shm_leases: dict[int, Lease] = {}
        self._closed = False
        # Responses held back behind a pending SSD read, in request order.
        self._replies: deque[_Reply] = deque()
        self._fetches: set[asyncio.Task[Lease | None]] = set()
        self._remote: set[asyncio.Future[tuple[bytes, int] | None]] = set()
        self._no_forward = False  # the frame being dispatched came from a peer
        self._reading = True
        # Transport ops: leases and reservations held per batch id; the RDMA queue pair.
        self._batch_ids = itertools.count(1)
        self._lease_batches: dict[int, list[Lease]] = {}
        self._num_batch_leases = 0
        self._put_batches: dict[int, list[_Reserved]] = {}
        self._reserved_bytes = 0
        self._reserved_since: float | None = None
        self._batch_fetches: set[asyncio.Future[list[Lease | None]]] = set()
        self._rdma: object | None = None

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        # High-water mark 0: pause_writing as soon as a response is not fully handed to the kernel
        # (see "Leases while sending" in the module docstring).
        transport.set_write_buffer_limits(high=0, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._peer = str(transport.get_extra_info("peername"))
        self._server.connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._sink is not None:
            return self._sink[self._sink_pos :]
        if self._discard_left:
            return self._view[: min(self._discard_left, RECV_BUFFER_BYTES)]
        if self._end == RECV_BUFFER_BYTES:
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._sink is not None:
                self._sink_pos += nbytes
                if self._sink_pos == len(self._sink):
                    callback = self._on_sink_full
                    self._sink, self._on_sink_full = None, None
                    self._payload_started_at = None
                    assert callback is not None
                    callback()
                    self._process()
            elif self._discard_left:
                self._discard_left -= nbytes
                if not self._discard_left:
                    self._payload_started_at = None
                    self._write(self._discard_reply)
                    self._process()
            else:
                self._end += nbytes
                self._process()
        except FrameError as exc:
            self.abort(f"malformed frame: {exc}")
        except Exception:
            logger.exception("internal error on connection %s; closing it", self._peer)
            self.abort(None)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        if self._pending is not None:
            self._node.revoke(self._pending)
            self._pending = None
            logger.info("connection %s lost mid-PUT; reservation revoked", self._peer)
        self._sink = None
        for lease in self._unsent_leases:
            self._node.release(lease)
        self._unsent_leases.clear()
        for lease in self._shm_leases.values():
            self._node.release(lease)
        self._shm_leases.clear()
        for leases in self._lease_batches.values():
            for lease in leases:
                self._node.release(lease)
        self._lease_batches.clear()
        for reserved in self._put_batches.values():
            for entry in reserved:
                if entry.pending is not None:
                    self._node.revoke(entry.pending)
        self._put_batches.clear()
        if self._rdma is not None:
            self._server.drop_rdma(self._rdma)
            self._rdma = None
        for reply in self._replies:
            if reply.lease is not None:
                self._node.release(reply.lease)
        self._replies.clear()
        # SSD reads still in flight release what they bring when they finish (_fetch_done).
        self._server.connection_closed()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        for lease in self._unsent_leases:
            self._node.release(lease)
        self._unsent_leases.clear()
        if self._transport is None or self._closed:
            return
        self._flush_replies()
        self._resume()

    # -- control ----------------------------------------------------------------------------------

    def abort(self, reason: str | None) -> None:
        """Drop the connection at once (unsent responses are discarded)."""
        if reason:
            logger.warning("closing connection %s: %s", self._peer, reason)
        if self._transport is not None and not self._closed:
            self._closed = True
            self._transport.abort()

    def close(self) -> None:
        """Close after flushing what has been written (graceful shutdown)."""
        if self._transport is not None and not self._closed:
            self._transport.close()

    def payload_age(self, now: float) -> float:
        """Seconds this connection has been receiving one payload (0 if it is not)."""
        started = self._payload_started_at
        if self._reserved_since is not None:  # an open RESERVE_BATCH is a payload in flight
            started = min(started or now, self._reserved_since)
        return 0.0 if started is None else now - started

    # -- parsing ----------------------------------------------------------------------------------

    def _compact(self) -> None:
        remaining = self._end - self._start
        if self._start:
            self._buf[:remaining] = self._view[self._start : self._end]
        self._start, self._end = 0, remaining

    def _resume(self) -> None:
        """Parse again after a pause (writes drained, an SSD read finished)."""
        self._update_reading()
        try:
            self._process()
        except FrameError as exc:
            self.abort(f"malformed frame: {exc}")
        except Exception:
            logger.exception("internal error on connection %s; closing it", self._peer)
            self.abort(None)

    def _fetch_blocked(self) -> bool:
        return (
            len(self._fetches) + len(self._remote) + len(self._batch_fetches)
            >= MAX_FETCHES_PER_CONNECTION
            or len(self._replies) >= MAX_QUEUED_REPLIES
        )

    def _update_reading(self) -> None:
        """Read the socket only while we may parse: not write-paused, not at the fetch limit."""
        if self._transport is None or self._closed:
            return
        want = not self._write_paused and not self._fetch_blocked()
        if want and not self._reading:
            self._transport.resume_reading()
        elif not want and self._reading:
            self._transport.pause_reading()
        self._reading = want

    def _process(self) -> None:
        """Handle every complete frame in the buffer; stop at a partial one or when paused."""
        view = self._view
        while not self._write_paused and not self._closed and not self._fetch_blocked():
            start, avail = self._start, self._end - self._start
            if avail < FRAME_HEADER_BYTES:
                break
            header = FrameHeader.decode(view, start)
            header.check_request()
            if header.opcode is Op.PUT:
                if not self._begin_put(header):
                    break
                continue
            frame_end = start + FRAME_HEADER_BYTES + header.payload_len
            if frame_end <= self._end:
                self._start = frame_end
                self._no_forward = bool(view[start + 7] & FLAG_NO_FORWARD)  # raw flags byte
                self._dispatch(header, view[start + FRAME_HEADER_BYTES : frame_end])
                continue
            if FRAME_HEADER_BYTES + header.payload_len > RECV_BUFFER_BYTES:
                # A large key list: receive the rest of it into a buffer of its own.
                self._receive_large_frame(header)
            break
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start and RECV_BUFFER_BYTES - self._end < _PUT_PREFIX:
            self._compact()
        if self._fetch_blocked():
            self._update_reading()

    def _receive_large_frame(self, header: FrameHeader) -> None:
        payload = memoryview(bytearray(header.payload_len))
        have = self._end - self._start - FRAME_HEADER_BYTES
        body = self._start + FRAME_HEADER_BYTES
        payload[:have] = self._view[body : body + have]
        self._start = self._end = 0
        self._sink, self._sink_pos = payload, have
        self._on_sink_full = lambda: self._dispatch(header, payload)

    def _begin_put(self, header: FrameHeader) -> bool:
        """Start handling a PUT whose frame header is at ``_start``; False if more bytes needed."""
        start, avail = self._start, self._end - self._start
        length = header.payload_len
        if length < BLOCK_HEADER_BYTES:
            raise FrameError(f"PUT payload of {length} bytes has no block header")
        if avail < _PUT_PREFIX:
            return False
        body = start + FRAME_HEADER_BYTES
        try:
            block = BlockHeader.decode(self._view[body : body + BLOCK_HEADER_BYTES])
        except BlockFormatError as exc:
            logger.warning("PUT from %s with a bad block header: %s", self._peer, exc)
            self._reject_put(header, Status.BAD_REQUEST)
            return True
        if BLOCK_HEADER_BYTES + block.payload_nbytes != length:
            self._reject_put(header, Status.BAD_REQUEST)
            return True
        if length > self._server.config.max_block_bytes:
            self._reject_put(header, Status.TOO_LARGE)
            return True
        result = self._node.begin_put(block.key, length)
        if isinstance(result, PutStatus):
            self._reject_put(header, Status(result))
            return True
        have = min(avail - FRAME_HEADER_BYTES, length)
        result.view[:have] = self._view[body : body + have]
        self._start = body + have
        if have == length:
            self._finish_put(header, block, result)
            return True
        # The rest of the block goes straight from the socket into the arena.
        self._pending = result
        self._start = self._end = 0
        self._sink, self._sink_pos = result.view, have
        self._on_sink_full = lambda: self._finish_put(header, block, result)
        self._payload_started_at = self._server.loop_time()
        return True

    def _finish_put(self, header: FrameHeader, block: BlockHeader, pending: PendingPut) -> None:
        self._pending = None
        if verify(block, pending.view[BLOCK_HEADER_BYTES:]):
            self._node.commit(pending)
            self._tiers.note_commit(pending.key)
            self._server.note_changed([block.key])
            status = Status.OK
        else:
            self._node.revoke(pending)
            logger.warning("PUT from %s failed its checksum; block dropped", self._peer)
            status = Status.CORRUPT
        self._write(pack_frame_header(Op.PUT, header.request_id, 0, 0, status))

    def _reject_put(self, header: FrameHeader, status: Status) -> None:
        """Skip a PUT's payload (now or as it arrives), then answer ``status``."""
        reply = pack_frame_header(Op.PUT, header.request_id, 0, 0, status)
        body = self._start + FRAME_HEADER_BYTES
        have = min(self._end - body, header.payload_len)
        self._start = body + have
        left = header.payload_len - have
        if not left:
            self._write(reply)
            return
        self._start = self._end = 0
        self._discard_left, self._discard_reply = left, reply
        self._payload_started_at = self._server.loop_time()

    # -- request handlers -----------------------------------------------------------------------

    def _dispatch(self, header: FrameHeader, payload: memoryview) -> None:
        op, rid = header.opcode, header.request_id
        node = self._node
        if op is Op.GET:
            self._handle_get(rid, bytes(payload))
        elif op is Op.MATCH_PREFIX:
            tiers = bytes(self._tiers.match_prefix(_split_keys(payload)))
            self._write(pack_frame_header(op, rid, len(tiers), len(tiers)) + tiers)
        elif op is Op.EXISTS:
            bitmap = encode_bitmap(self._tiers.exists(_split_keys(payload)))
            self._write(pack_frame_header(op, rid, header.count, len(bitmap)) + bitmap)
        elif op is Op.DELETE:
            keys = _split_keys(payload)
            deleted = self._tiers.delete(keys)
            self._server.note_changed(keys)
            self._write(pack_frame_header(op, rid, deleted, 0))
        elif op is Op.STATS:
            self._write_json(op, rid, self._server.stats())
        elif op is Op.SHM_INFO:
            self._write_json(op, rid, self._server.shm_info())
        elif op is Op.GET_SHM:
            self._handle_get_shm(rid, bytes(payload))
        elif op is Op.RELEASE:
            for (lease_id,) in LEASE_ID.iter_unpack(payload):
                lease = self._shm_leases.pop(lease_id, None)
                if lease is None:
                    logger.warning("RELEASE of unknown lease %d from %s", lease_id, self._peer)
                else:
                    node.release(lease)
        elif op is Op.LEASE_BATCH:
            self._handle_lease_batch(rid, _split_keys(payload))
        elif op is Op.RELEASE_BATCH:
            self._handle_release_batch(payload)
        elif op is Op.RESERVE_BATCH:
            self._handle_reserve_batch(rid, payload)
        elif op is Op.COMMIT_BATCH:
            self._handle_commit_batch(rid, BATCH_ID.unpack(payload)[0])
        elif op is Op.RDMA_CONNECT:
            self._handle_rdma_connect(rid, payload)
        else:  # pragma: no cover - check_request admits only the ops above
            raise FrameError(f"unexpected opcode {op}")

    def _handle_get(self, request_id: int, key: bytes) -> None:
        found = self._tiers.acquire(key)
        if isinstance(found, Lease):
            self._send(self._block_reply(request_id, found, Tier.DRAM))
        elif found is Tier.SSD:
            self._start_fetch(Op.GET, request_id, key)
        elif not self._no_forward and self._server.peers_holding(key):
            self._start_remote_fetch(request_id, key)
        else:
            self._write(pack_frame_header(Op.GET, request_id, 0, 0, Status.MISS))

    def _start_remote_fetch(self, request_id: int, key: bytes) -> None:
        """Read ``key`` from a peer on a thread (read-through); its response keeps its place."""
        reply = _Reply([], ready=False)
        self._replies.append(reply)
        future = self._server.fetch_remote(key)
        self._remote.add(future)
        future.add_done_callback(functools.partial(self._remote_done, reply, request_id))

    def _remote_done(
        self,
        reply: _Reply,
        request_id: int,
        future: asyncio.Future[tuple[bytes, int] | None],
    ) -> None:
        self._remote.discard(future)
        found: tuple[bytes, int] | None = None
        if not future.cancelled():
            if future.exception() is not None:
                logger.warning("read-through failed: %s", future.exception())
            else:
                found = future.result()
        if self._closed:
            return
        if found is None:
            reply.parts = [pack_frame_header(Op.GET, request_id, 0, 0, Status.MISS)]
        else:
            block, tier = found
            reply.parts = [pack_frame_header(Op.GET, request_id, tier, len(block)), block]
        reply.ready = True
        self._flush_replies()
        self._resume()

    def _handle_get_shm(self, request_id: int, key: bytes) -> None:
        if len(self._shm_leases) + len(self._fetches) >= MAX_SHM_LEASES_PER_CONNECTION:
            logger.warning("%s holds too many shared-memory leases", self._peer)
            self._write(pack_frame_header(Op.GET_SHM, request_id, 0, 0, Status.BAD_REQUEST))
            return
        found = self._tiers.acquire(key)
        if isinstance(found, Lease):
            self._write(self._shm_reply(request_id, found, Tier.DRAM))
        elif found is Tier.SSD:
            self._start_fetch(Op.GET_SHM, request_id, key)
        else:
            self._write(pack_frame_header(Op.GET_SHM, request_id, 0, 0, Status.MISS))

    # -- transport ops (batched leases and reservations, RDMA) ---------------------------------

    def _handle_lease_batch(self, request_id: int, keys: list[bytes]) -> None:
        held = len(self._shm_leases) + self._num_batch_leases
        if held + len(keys) > MAX_SHM_LEASES_PER_CONNECTION:
            logger.warning("%s holds too many shared-memory leases", self._peer)
            self._write(pack_frame_header(Op.LEASE_BATCH, request_id, 0, 0, Status.BAD_REQUEST))
            return
        found: list[Lease | None] = []
        tiers = bytearray(len(keys))
        on_ssd: list[int] = []
        for i, key in enumerate(keys):
            result = self._tiers.acquire(key)
            if isinstance(result, Lease):
                found.append(result)
                tiers[i] = Tier.DRAM
            else:
                found.append(None)
                if result is Tier.SSD and len(on_ssd) < MAX_SSD_READS_PER_BATCH:
                    on_ssd.append(i)
                elif result is Tier.SSD:
                    tiers[i] = LEASE_DEFERRED
        counters = self._server.transfers
        counters.lease_batches += 1
        if not on_ssd:
            self._write(self._lease_batch_reply(request_id, found, tiers))
            return
        # Read the SSD blocks into the arena first; the reply keeps its place in line.
        reply = _Reply([], ready=False)
        self._replies.append(reply)
        fetches = [self._tiers.fetch(keys[i]) for i in on_ssd]
        gathered = asyncio.gather(*fetches)
        self._batch_fetches.add(gathered)

        def done(future: asyncio.Future[list[Lease | None]]) -> None:
            self._batch_fetches.discard(future)
            leases: list[Lease | None] = [None] * len(on_ssd)
            if not future.cancelled() and future.exception() is None:
                leases = future.result()
            elif not future.cancelled():
                logger.error("SSD fetch failed", exc_info=future.exception())
            for i, lease in zip(on_ssd, leases, strict=True):
                found[i] = lease
                tiers[i] = Tier.SSD if lease is not None else 0
            if self._closed:
                for lease in found:
                    if lease is not None:
                        self._node.release(lease)
                return
            reply.parts = [self._lease_batch_reply(request_id, found, tiers)]
            reply.ready = True
            self._flush_replies()
            self._resume()

        gathered.add_done_callback(done)

    def _lease_batch_reply(
        self, request_id: int, found: list[Lease | None], tiers: bytearray
    ) -> bytes:
        batch_id = next(self._batch_ids)
        leases = [lease for lease in found if lease is not None]
        self._lease_batches[batch_id] = leases
        self._num_batch_leases += len(leases)
        self._server.transfers.batch_leased_blocks += len(leases)
        spans = tuple((0, 0) if f is None else (f.offset, f.nbytes) for f in found)
        body = LeaseBatchReply(batch_id, spans, bytes(tiers)).encode()
        return pack_frame_header(Op.LEASE_BATCH, request_id, len(found), len(body)) + body

    def _handle_release_batch(self, payload: memoryview) -> None:
        for (batch_id,) in BATCH_ID.iter_unpack(payload):
            leases = self._lease_batches.pop(batch_id, None)
            if leases is None:
                logger.warning("RELEASE_BATCH of unknown batch %d from %s", batch_id, self._peer)
                continue
            self._num_batch_leases -= len(leases)
            for lease in leases:
                self._node.release(lease)

    def _handle_reserve_batch(self, request_id: int, payload: memoryview) -> None:
        items = list(RESERVE_ITEM.iter_unpack(payload))
        counters = self._server.transfers
        counters.reserve_batches += 1
        wanted = sum(nbytes for _, nbytes in items)
        limit = int(self._node.arena.size * MAX_RESERVED_FRACTION)
        if self._reserved_bytes + wanted > limit:
            counters.reserve_batches_refused += 1
            self._write(pack_frame_header(Op.RESERVE_BATCH, request_id, 0, 0, Status.FULL))
            return
        max_bytes = self._server.config.max_block_bytes
        arena = self._node.arena
        reserved: list[_Reserved] = []
        offsets: list[int] = []
        for key, nbytes in items:
            entry = _Reserved(Status.BAD_REQUEST, key, nbytes, None)
            reserved.append(entry)
            if nbytes > max_bytes:
                entry.status = Status.TOO_LARGE
            elif nbytes >= BLOCK_HEADER_BYTES:
                result = self._node.begin_put(key, nbytes)
                if isinstance(result, PutStatus):
                    entry.status = Status(result)
                else:
                    entry.status, entry.pending = Status.OK, result
                    self._reserved_bytes += nbytes
                    counters.reserved_blocks += 1
                    offsets.append(arena.offset_of(result.view))
                    continue
            offsets.append(0)
        batch_id = next(self._batch_ids)
        self._put_batches[batch_id] = reserved
        if self._reserved_since is None:
            self._reserved_since = self._server.loop_time()
        statuses = bytes(entry.status for entry in reserved)
        body = ReserveBatchReply(batch_id, tuple(offsets), statuses).encode()
        self._write(pack_frame_header(Op.RESERVE_BATCH, request_id, len(items), len(body)) + body)

    def _handle_commit_batch(self, request_id: int, batch_id: int) -> None:
        reserved = self._put_batches.pop(batch_id, None)
        if reserved is None:
            logger.warning("COMMIT_BATCH of unknown batch %d from %s", batch_id, self._peer)
            self._write(pack_frame_header(Op.COMMIT_BATCH, request_id, 0, 0, Status.BAD_REQUEST))
            return
        if not self._put_batches:
            self._reserved_since = None
        counters = self._server.transfers
        statuses = bytearray()
        committed: list[bytes] = []
        for entry in reserved:
            pending = entry.pending
            if pending is None:
                statuses.append(entry.status)
                continue
            self._reserved_bytes -= pending.nbytes
            if self._written_block_ok(entry, pending):
                self._node.commit(pending)
                self._tiers.note_commit(pending.key)
                committed.append(pending.key)
                counters.committed_blocks += 1
                statuses.append(Status.OK)
            else:
                self._node.revoke(pending)
                counters.corrupt_blocks += 1
                logger.warning("direct PUT from %s wrote a bad block header", self._peer)
                statuses.append(Status.CORRUPT)
        if committed:
            self._server.note_changed(committed)
        reply = pack_frame_header(Op.COMMIT_BATCH, request_id, len(statuses), len(statuses))
        self._write(reply + bytes(statuses))

    def _written_block_ok(self, entry: _Reserved, pending: PendingPut) -> bool:
        """Whether the client wrote a valid block of the reserved key and size.

        The header must be valid for that key and length (readers trust it). The payload's
        checksum is checked here only if it crossed a network (RDMA WRITE): a shared-memory
        client maps the arena read-write and could change a block at any time, so checking it at
        commit would cost a read of every block and promise nothing; every reader verifies it.
        """
        view = pending.view
        try:
            block = BlockHeader.decode(view[:BLOCK_HEADER_BYTES])
        except BlockFormatError:
            return False
        if block.key != entry.key or BLOCK_HEADER_BYTES + block.payload_nbytes != entry.nbytes:
            return False
        return self._rdma is None or verify(block, view[BLOCK_HEADER_BYTES:])

    def _handle_rdma_connect(self, request_id: int, payload: memoryview) -> None:
        try:
            client = RdmaEndpointInfo.decode(payload)
        except ValueError as exc:
            raise FrameError(f"bad RDMA_CONNECT: {exc}") from None
        endpoint = self._server.rdma_endpoint()
        reason = endpoint if isinstance(endpoint, str) else ""
        if not reason and self._rdma is not None:
            reason = "this connection already has an RDMA queue pair"
        if not reason:
            assert not isinstance(endpoint, str) and endpoint is not None
            try:
                self._rdma, info = endpoint.accept(client)
            except Exception as exc:  # verbs errors: answer, keep the connection (it is TCP)
                reason = f"cannot connect a queue pair: {exc}"
            else:
                self._server.transfers.rdma_connections += 1
                body = info.encode()
                self._write(pack_frame_header(Op.RDMA_CONNECT, request_id, 0, len(body)) + body)
                return
        text = reason.encode()
        self._write(
            pack_frame_header(Op.RDMA_CONNECT, request_id, 0, len(text), Status.UNSUPPORTED) + text
        )

    def _block_reply(self, request_id: int, lease: Lease, tier: Tier) -> _Reply:
        """A GET response written from the arena (a view, no copy) under ``lease``."""
        header = pack_frame_header(Op.GET, request_id, int(tier), lease.nbytes)
        return _Reply([header, lease.view], lease)

    def _shm_reply(self, request_id: int, lease: Lease, tier: Tier) -> bytes:
        """A GET_SHM response; the lease stays held until the client's RELEASE."""
        self._shm_leases[lease.lease_id] = lease
        body = SHM_LEASE.pack(lease.lease_id, lease.offset, lease.nbytes)
        return pack_frame_header(Op.GET_SHM, request_id, int(tier), len(body)) + body

    def _start_fetch(self, op: Op, request_id: int, key: bytes) -> None:
        """Read ``key`` from SSD in the background; its response keeps its place in line."""
        reply = _Reply([], ready=False)
        self._replies.append(reply)
        task = asyncio.get_running_loop().create_task(self._tiers.fetch(key))
        self._fetches.add(task)
        task.add_done_callback(functools.partial(self._fetch_done, reply, op, request_id))

    def _fetch_done(
        self, reply: _Reply, op: Op, request_id: int, task: asyncio.Task[Lease | None]
    ) -> None:
        self._fetches.discard(task)
        lease: Lease | None = None
        if not task.cancelled():
            if task.exception() is not None:
                logger.error("SSD fetch failed", exc_info=task.exception())
            else:
                lease = task.result()
        if self._closed:
            if lease is not None:
                self._node.release(lease)
            return
        if lease is None:
            reply.parts = [pack_frame_header(op, request_id, 0, 0, Status.MISS)]
        elif op is Op.GET:
            filled = self._block_reply(request_id, lease, Tier.SSD)
            reply.parts, reply.lease = filled.parts, filled.lease
        else:
            reply.parts = [self._shm_reply(request_id, lease, Tier.SSD)]
        reply.ready = True
        self._flush_replies()
        self._resume()

    def _flush_replies(self) -> None:
        """Write the responses at the head of the line that are ready."""
        replies = self._replies
        while replies and replies[0].ready and not self._write_paused and not self._closed:
            self._transmit(replies.popleft())

    def _send(self, reply: _Reply) -> None:
        if self._replies:
            self._replies.append(reply)  # behind a pending SSD read
            self._flush_replies()
        else:
            self._transmit(reply)

    def _transmit(self, reply: _Reply) -> None:
        if self._transport is None or self._closed:
            if reply.lease is not None:
                self._node.release(reply.lease)
            return
        self._transport.writelines(reply.parts)
        if reply.lease is None:
            return
        if self._transport.get_write_buffer_size():
            self._unsent_leases.append(reply.lease)  # released by resume_writing/connection_lost
        else:
            self._node.release(reply.lease)

    def _write_json(self, op: Op, request_id: int, value: object) -> None:
        body = json.dumps(value, sort_keys=True).encode()
        self._write(pack_frame_header(op, request_id, 0, len(body)) + body)

    def _write(self, data: bytes) -> None:
        self._send(_Reply([data]))


def _split_keys(payload: memoryview) -> list[bytes]:
    raw = bytes(payload)
    return [raw[i : i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]


class StoreServer:
    """Owns the listening socket, the connections and the node; start, serve, stop."""

    def __init__(
        self, config: StoreNodeConfig, node: StoreNode, tiers: TierManager | None = None
    ) -> None:
        self.config = config
        self.node = node
        self.tiers = tiers if tiers is not None else TierManager(node)
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all_closed: asyncio.Event | None = None
        self._boot_id = boot_id()
        # Distribution (docs/design/kvstore.md §14); all None for a standalone node.
        self.agent: NodeAgent | None = None
        self.view: ClusterView | None = None
        self.fetcher: PeerFetcher | None = None
        # This node's embedded metadata, served to the host over gRPC (kvstore.metadata.service).
        self.metadata_server: MetadataServer | None = None
        self.transfers = TransferCounters()
        self._rdma: RdmaNodeEndpoint | str | None = None  # endpoint, or why there is none

    def rdma_endpoint(self) -> RdmaNodeEndpoint | str:
        """The arena registered for RDMA (on first use), or the reason RDMA is unavailable."""
        if self._rdma is None:
            try:
                self._rdma = RdmaNodeEndpoint(self.node.arena.address, self.node.arena.size)
            except TransportUnavailable as exc:
                self._rdma = str(exc)
                log_unavailable_once(TransportKind.RDMA, str(exc))
        return self._rdma

    def drop_rdma(self, handle: object) -> None:
        if isinstance(self._rdma, RdmaNodeEndpoint):
            self._rdma.drop(handle)

    async def start(self) -> tuple[str, int]:
        """Listen and return the bound (host, port) -- the port is real even if 0 was asked."""
        self._loop = asyncio.get_running_loop()
        self._all_closed = asyncio.Event()
        self._server = await self._loop.create_server(
            lambda: _Connection(self),
            self.config.host,
            self.config.port,
            reuse_address=True,
            backlog=1024,
        )
        self._reaper = self._loop.create_task(self._reap_stalled_payloads())
        self.tiers.start()
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def join_cluster(self, host: str, port: int) -> None:
        """Register with the metadata store, start publishing and following the cluster."""
        config = self.config
        if config.metadata is None:
            return
        loop = asyncio.get_running_loop()
        store = await loop.run_in_executor(None, open_metadata_store, config.metadata)
        if isinstance(store, EmbeddedMetadataStore):  # only an embedded store is served
            self.metadata_server = MetadataServer(store, config.host, config.metadata_port)
            await self.metadata_server.start()
        node_id = config.node_id or f"{host}:{port}"
        info = {
            "endpoint": f"{host}:{port}",
            "pid": os.getpid(),
            "boot_id": self._boot_id,
            "arena_path": self.node.arena.path,
        }
        self.agent = NodeAgent(
            store,
            node_id,
            info,
            self.tiers,
            heartbeat_interval_s=config.heartbeat_interval_s,
            heartbeat_timeout_s=config.heartbeat_timeout_s,
            flush_interval_s=config.event_flush_interval_s,
            reconcile_interval_s=config.reconcile_interval_s,
        )
        await self.agent.start()
        self.view = ClusterView(store, poll_interval_s=min(0.1, config.heartbeat_interval_s))
        await loop.run_in_executor(None, self.view.start)
        self.fetcher = PeerFetcher()
        logger.info("joined the cluster as %s (metadata %s)", node_id, config.metadata)

    def note_changed(self, keys: list[bytes]) -> None:
        if self.agent is not None:
            self.agent.note_changed(keys)

    def peers_holding(self, key: bytes) -> list[str]:
        """Endpoints of live peers that hold ``key``, fastest tier first."""
        if self.view is None or self.agent is None:
            return []
        live = self.view.live_nodes()
        me = self.agent.node_id
        return [live[n] for n, _tier in self.view.holders(key) if n != me and n in live]

    def fetch_remote(self, key: bytes) -> asyncio.Future[tuple[bytes, int] | None]:
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(None, self._fetch_remote_blocking, key)

    def _fetch_remote_blocking(self, key: bytes) -> tuple[bytes, int] | None:
        assert self.fetcher is not None
        for endpoint in self.peers_holding(key):
            try:
                found = self.fetcher.get_block(endpoint, key)
            except OSError as exc:
                logger.warning("read-through from %s failed: %s", endpoint, exc)
                continue
            if found is not None:
                if self.config.replicate_on_read and self._loop is not None:
                    self._loop.call_soon_threadsafe(self._keep_copy, key, found[0])
                return found
        return None

    def _keep_copy(self, key: bytes, block: bytes) -> None:
        if self.node.put(key, block) is PutStatus.OK:
            self.tiers.note_commit(key)
            self.note_changed([key])

    async def leave_cluster(self) -> None:
        """Graceful leave: migrate DRAM blocks if configured, then clear and deregister."""
        agent, view = self.agent, self.view
        if agent is None or view is None:
            return
        loop = asyncio.get_running_loop()
        if self.config.leave_policy == "migrate":
            try:
                await self._migrate(loop, agent, view)
            except Exception:
                logger.exception("migration on leave failed; dropping the rest")
        await agent.stop()
        await loop.run_in_executor(None, view.stop)
        if self.metadata_server is not None:
            await self.metadata_server.stop()
            self.metadata_server = None
        if self.fetcher is not None:
            self.fetcher.close()
        self.agent = None
        self.view = None

    async def _migrate(
        self, loop: asyncio.AbstractEventLoop, agent: NodeAgent, view: ClusterView
    ) -> None:
        peers = {n: e for n, e in view.live_nodes().items() if n != agent.node_id}
        if not peers or self.fetcher is None:
            logger.warning("leave-policy migrate: no live peer; dropping DRAM blocks")
            return
        target = max(peers, key=lambda n: zlib.crc32(f"{n}/{agent.node_id}".encode()))
        moved, batch, size = 0, [], 0
        keys = agent.dram_keys()
        for i, key in enumerate(keys):
            block = self.node.get(key)
            if block is not None:
                batch.append(block)
                size += len(block)
            if batch and (size >= 16 * 1024**2 or i == len(keys) - 1):
                statuses = await loop.run_in_executor(
                    None, self.fetcher.put_blocks, peers[target], batch
                )
                moved += sum(1 for s in statuses if s in (Status.OK, Status.EXISTS))
                batch, size = [], 0
        logger.info("migrated %d of %d DRAM blocks to %s", moved, len(keys), target)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop accepting, let connections flush for up to ``grace_s``, then drop the rest;
        then stop the tiers' background work and close the SSD tier."""
        await self.leave_cluster()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self.connections and self._all_closed is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace_s)
        for conn in list(self.connections):
            conn.abort("shutting down")
        if self._server is not None:
            # After the connections: some loops' wait_closed also waits for them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), grace_s)
        await asyncio.sleep(0)  # let connection_lost callbacks run
        await self.tiers.close()

    def loop_time(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def connection_closed(self) -> None:
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    def stats(self) -> dict[str, object]:
        stats = dataclasses.asdict(self.node.stats())
        stats["num_connections"] = len(self.connections)
        stats["transfers"] = dataclasses.asdict(self.transfers)
        stats["tiers"] = dataclasses.asdict(self.tiers.stats())
        ssd = self.tiers.ssd
        stats["ssd"] = dataclasses.asdict(ssd.stats()) if ssd is not None else None
        return stats

    def shm_info(self) -> dict[str, object]:
        arena = self.node.arena
        return {
            "path": arena.path,
            "size": arena.size,
            "device": arena.device,
            "inode": arena.inode,
            "boot_id": self._boot_id,
        }

    async def _reap_stalled_payloads(self) -> None:
        timeout = self.config.put_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = self.loop_time()
            for conn in list(self.connections):
                if conn.payload_age(now) > timeout:
                    conn.abort(f"payload not received within {timeout:g}s; abandoning it")


async def _serve(config: StoreNodeConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for path in remove_stale_arenas(config.arena_dir):
        logger.warning("removed the arena file of a node that died: %s", path)
    ssd = _open_ssd(config)
    try:
        arena = Arena(
            config.arena_size_bytes,
            config.page_size_bytes,
            directory=config.arena_dir,
            prefault=config.prefault,
        )
    except BaseException:
        if ssd is not None:
            ssd.close()
        raise
    try:
        node = StoreNode(arena, policy=make_policy(PolicyKind(config.eviction_policy)))
        tiers = TierManager(
            node,
            ssd,
            high_watermark=config.high_watermark,
            low_watermark=config.low_watermark,
            promote=config.promote,
            write_behind=config.write_behind,
            read_threads=config.ssd_read_threads,
            sweep_interval_s=config.ssd_sweep_interval_s,
        )
        server = StoreServer(config, node, tiers)
        try:  # stop() also closes the SSD tier, before the arena its threads read from
            host, port = await server.start()
            await server.join_cluster(host, port)
            print(f"kvstore node listening on {host}:{port}", flush=True)
            logger.info(
                "arena %s: %d bytes, page %d, max block %d",
                arena.path,
                arena.size,
                config.page_size_bytes,
                config.max_block_bytes,
            )
            await stop.wait()
            logger.info("stopping")
        finally:
            await server.stop()
    finally:
        arena.close()
    return 0


def _open_ssd(config: StoreNodeConfig) -> SSDTier | None:
    if config.ssd_dir is None:
        return None
    if not tune_malloc_for_lmdb():
        logger.info("could not tune malloc for lmdb; SSD puts may be slower")
    ssd = SSDTier(
        config.ssd_dir,
        config.ssd_size_bytes,
        config.ssd_ttl_s,
        sync=config.ssd_sync,
        read_threads=config.ssd_read_threads,
    )
    stats = ssd.stats()
    logger.info(
        "SSD tier %s: %d blocks (%d bytes) recovered; size %d, budget %d, ttl %gs, sync %s",
        ssd.path,
        stats.num_blocks,
        stats.stored_bytes,
        stats.capacity_bytes,
        stats.budget_bytes,
        stats.ttl_s,
        stats.sync,
    )
    return ssd


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m kvstore.server``; returns the process exit status."""
    config = StoreNodeConfig.from_cli(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s kvstore[{os.getpid()}] %(name)s: %(message)s",
    )
    try:
        return int(uvloop.run(_serve(config)))
    except (OSError, SSDTierError) as exc:
        logger.error("cannot start the store node: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
