"""One client connection of a store node: framing, PUT straight into the arena, replies in order.

Data path
    Each connection is an ``asyncio.BufferedProtocol``, not a stream reader: asyncio streams copy
    every chunk into a fresh ``bytes`` and run 2-4x slower here. Small frames are received into one
    preallocated 68 KiB buffer per connection and parsed in place. A PUT's payload is received
    *directly into the arena extent* reserved for it (``get_buffer`` returns a view of the extent),
    so a block crosses from the socket to the arena with the kernel's one copy. A GET writes a view
    of the arena (``writelines([header, view])``, one ``writev``) -- again no copy in Python. Every
    other op is dispatched through the op → handler table (:mod:`kvstore.server.handlers`).

Bounded memory (kvstore.server.limits)
    Every request but a PUT fits the receive buffer whole (the frame header's check refuses a
    larger one before a byte of its payload is read), so a connection never allocates for a
    frame; the buffer is an anonymous mapping, so an idle connection touches one page of it.

Leases while sending
    uvloop keeps a reference to a view it could not send at once and finishes the send later. The
    GET handler therefore holds the block's read lease until the transport's write buffer is empty;
    until then eviction and delete cannot free (and a later PUT cannot overwrite) those bytes. The
    write-buffer high-water mark is 0, so ``pause_writing`` fires whenever a response is not fully
    handed to the kernel; the connection then also stops reading and parsing (back-pressure: a
    client that pipelines GETs without reading cannot make the node buffer unboundedly), and
    ``resume_writing`` releases the held leases and resumes.

SSD tier (docs/design/kvstore.md §7)
    A GET that misses DRAM but hits SSD is read on a thread into an arena extent; meanwhile the
    connection keeps parsing and answering, queuing later responses behind the pending one
    (``queued``: :meth:`Connection.park`, :meth:`Connection.fill`), so responses stay in request
    order while several SSD reads run at once. A connection with ``MAX_FETCHES_PER_CONNECTION``
    reads or ``MAX_QUEUED_REPLIES`` responses outstanding stops reading its socket until one
    completes.

Failure handling
    A malformed frame (see kvstore.wire) closes only its connection. A connection lost in the
    middle of a PUT revokes the reservation. The server's reaper closes a connection whose
    :meth:`Connection.activity` has passed a deadline (:class:`kvstore.server.limits.Deadlines`:
    a frame stalled mid-way, a PUT's payload not finished, a lease held too long, no traffic),
    so that a stalled peer cannot pin arena space or a connection slot. Leases of a lost
    connection (including shared-memory and batch leases) are released. An unexpected exception
    in a handler is logged and closes that connection; the node keeps serving. Every warning a
    peer can cause goes through the server's rate-limited log: one line per kind per 10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import mmap
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from kvstore.blocks.format import BLOCK_HEADER_BYTES, BlockFormatError, BlockHeader, verify
from kvstore.blocks.tier import Tier
from kvstore.node.store import Lease, PendingPut
from kvstore.server import auth
from kvstore.server.handlers import HANDLERS
from kvstore.server.limits import (
    MAX_FETCHES_PER_CONNECTION,
    MAX_QUEUED_REPLIES,
    RECV_BUFFER_BYTES,
    Activity,
    Pin,
)
from kvstore.server.transfer import TransferState
from kvstore.wire.frame import (
    FLAG_NO_FORWARD,
    FRAME_HEADER_BYTES,
    FrameError,
    FrameHeader,
    Op,
    Status,
    pack_frame_header,
)
from kvstore.wire.messages import SHM_LEASE
from kvstore.wire.types import PutStatus

if TYPE_CHECKING:
    from kvstore.server.lifecycle import StoreServer

__all__ = ["Connection", "Reply"]

logger = logging.getLogger("kvstore.server")

_PUT_PREFIX = FRAME_HEADER_BYTES + BLOCK_HEADER_BYTES


@dataclass(slots=True)
class Reply:
    """A response waiting for an earlier one (an SSD read) so that order is kept."""

    parts: list[bytes | memoryview]
    lease: Lease | None = None  # released once the view has been handed to the kernel
    ready: bool = True


class Connection(asyncio.BufferedProtocol):
    """One client connection: a frame parser feeding the node, with receive-into-arena for PUT."""

    def __init__(self, server: StoreServer) -> None:
        self.server = server
        self.node = server.node
        self.tiers = server.tiers
        self._transport: asyncio.Transport | None = None
        self.peer = "?"
        self._view = memoryview(b"")  # the receive buffer, mapped once the connection is admitted
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
        self._frame_since: float | None = None  # a frame partly received while reading
        self._last_progress = self._accepted_at = server.loop_time()
        self._write_paused = False
        self._unsent_leases: list[Lease] = []
        self.shm_leases: dict[int, Lease] = {}
        self.shm_leased_bytes = 0
        self._shm_leased_at: dict[int, float] = {}  # lease id -> loop time granted
        self._write_paused_at: float | None = None  # since when replies wait for the socket
        self.closed = False
        # Responses held back behind a pending SSD read, in request order.
        self.queued: deque[Reply] = deque()
        self.fetches: set[asyncio.Task[Lease | None]] = set()
        self.remote_fetches: set[asyncio.Future[Any]] = set()  # read-through, hinted matches
        self.no_forward = False  # the frame being dispatched came from a peer
        self._reading = True
        # Transport ops: leases and reservations held per batch id; the RDMA queue pair.
        self.transfer = TransferState()
        self.auth = auth.ConnectionAuth()  # the HELLO handshake (kvstore.server.auth)

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self.peer = str(transport.get_extra_info("peername"))
        if not auth.connected(self, transport) or not self.server.admit(self):
            self.closed = True
            transport.abort()
            return
        self._view = memoryview(mmap.mmap(-1, RECV_BUFFER_BYTES))
        # High-water mark 0: pause_writing as soon as a response is not fully handed to the kernel
        # (see "Leases while sending" in the module docstring).
        # TLS: the SSL layer encrypts (copies) a reply as it is written, so no arena view outlives
        # the write; its default limits apply (a high-water mark of 0 would pause it for good:
        # it pauses at size >= high, and checks again only on its own writes and reads).
        if self.server.tls is None:
            transport.set_write_buffer_limits(high=0, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._sink is not None:
            return self._sink[self._sink_pos :]
        if self._discard_left:
            return self._view[: min(self._discard_left, RECV_BUFFER_BYTES)]
        if self._end == RECV_BUFFER_BYTES:
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._last_progress = self.server.loop_time()
        self.server.transfers.bytes_received += nbytes
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
                    self.write(self._discard_reply)
                    self._process()
            else:
                self._end += nbytes
                self._process()
        except Exception as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._pending is not None:
            self.node.revoke(self._pending)
            self._pending = None
            self.server.log.info(
                "lost mid-PUT", "connection %s lost mid-PUT; reservation revoked", self.peer
            )
        self._sink = None
        for lease in self._unsent_leases:
            self.node.release(lease)
        self._unsent_leases.clear()
        for lease in self.shm_leases.values():
            self.node.release(lease)
        self.shm_leases.clear()
        self.shm_leased_bytes = 0
        self.transfer.release_all(self.node, self.server.drop_rdma)
        for reply in self.queued:
            if reply.lease is not None:
                self.node.release(reply.lease)
        self.queued.clear()
        # SSD reads still in flight release what they bring when they finish (_fetch_done).
        self.server.connection_closed()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._write_paused_at is None:
            self._write_paused_at = self.server.loop_time()
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._write_paused_at = None
        self._last_progress = self.server.loop_time()
        for lease in self._unsent_leases:
            self.node.release(lease)
        self._unsent_leases.clear()
        if self._transport is None or self.closed:
            return
        self.flush_replies()
        self.resume()

    # -- control ----------------------------------------------------------------------------------

    def abort(
        self, reason: str | None, kind: str = "closing", level: int = logging.WARNING
    ) -> None:
        """Drop the connection at once (unsent responses are discarded); ``reason`` is logged
        (rate-limited per ``kind``)."""
        if reason and not self.closed:
            self.server.log.log(level, kind, "closing connection %s: %s", self.peer, reason)
        if self._transport is not None and not self.closed:
            self.closed = True
            self._transport.abort()

    def close(self) -> None:
        """Close after flushing what has been written (graceful shutdown)."""
        if self._transport is not None and not self.closed:
            self._transport.close()

    def activity(self) -> Activity:
        """This connection's clocks, for the reaper's deadlines (kvstore.server.limits)."""
        for lease_id in [i for i in self._shm_leased_at if i not in self.shm_leases]:
            del self._shm_leased_at[lease_id]  # released (RELEASE pops shm_leases only)
        granted = [*self._shm_leased_at.values(), *self.transfer.leased_at.values()]
        if self._unsent_leases and self._write_paused_at is not None:
            granted.append(self._write_paused_at)  # a GET reply its reader does not read
        payload = [
            t for t in (self._payload_started_at, self.transfer.reserved_since) if t is not None
        ]  # an open RESERVE_BATCH is a payload in flight
        frame_since = self._frame_since
        if self.server.authenticates and self.auth.identity is None:
            # Not authenticated yet: the handshake must be done within the header timeout.
            frame_since = min(frame_since or self._accepted_at, self._accepted_at)
        return Activity(
            last_progress=self._last_progress,
            frame_since=frame_since,
            payload_since=min(payload) if payload else None,
            lease_since=min(granted) if granted else None,
        )

    def pinned_bytes(self) -> int:
        """Arena bytes this connection holds leased (GET_SHM, LEASE_BATCH) or reserved
        (RESERVE_BATCH): what the pin limits count."""
        return self.shm_leased_bytes + self.transfer.leased_bytes + self.transfer.reserved_bytes

    def may_pin(self, nbytes: int, node_pinned: int, *, at_least_one: bool) -> Pin:
        """The pin limits' verdict on ``nbytes`` more, counted (STATS ``limits``) if not OK."""
        verdict = self.server.pin_limits.verdict(
            node_pinned, self.pinned_bytes(), nbytes, at_least_one=at_least_one
        )
        if verdict is Pin.DEFER:
            self.server.limits.pins_deferred += 1
        elif verdict is Pin.REFUSE:
            self.server.limits.pins_refused += 1
        return verdict

    # -- parsing ----------------------------------------------------------------------------------

    def _compact(self) -> None:
        remaining = self._end - self._start
        if self._start:
            self._view[:remaining] = self._view[self._start : self._end]
        self._start, self._end = 0, remaining

    def resume(self) -> None:
        """Parse again after a pause (writes drained, an SSD read finished)."""
        self._update_reading()
        try:
            self._process()
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        """Close after a malformed frame (expected) or a bug in a handler (logged)."""
        if isinstance(exc, FrameError):
            if not self.closed:
                self.server.limits.malformed_frames += 1
            self.abort(f"malformed frame: {exc}", "malformed frame")
        else:
            if not self.closed:
                self.server.log.log(
                    logging.ERROR,
                    "internal error",
                    "internal error on connection %s; closing it",
                    self.peer,
                    exc_info=exc,
                )
            self.abort(None)

    def _fetch_blocked(self) -> bool:
        return (
            len(self.fetches) + len(self.remote_fetches) + len(self.transfer.batch_fetches)
            >= MAX_FETCHES_PER_CONNECTION
            or len(self.queued) >= MAX_QUEUED_REPLIES
        )

    def _update_reading(self) -> None:
        """Read the socket only while we may parse: not write-paused, not at the fetch limit."""
        if self._transport is None or self.closed:
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
        partial = False  # stopped at a frame not yet complete (not at a pause of our own)
        while not self._write_paused and not self.closed and not self._fetch_blocked():
            start, avail = self._start, self._end - self._start
            if avail < FRAME_HEADER_BYTES:
                partial = avail > 0
                break
            header = FrameHeader.decode(view, start)
            header.check_request()  # every request but a PUT now fits the buffer whole
            if not auth.admit(self, header):
                break  # refused: the connection is closing
            if header.opcode is Op.PUT:
                if not self._begin_put(header):
                    partial = True
                    break
                continue
            frame_end = start + FRAME_HEADER_BYTES + header.payload_len
            if frame_end > self._end:
                partial = True
                break
            self._start = frame_end
            self.no_forward = bool(header.flags & FLAG_NO_FORWARD)
            self._dispatch(header, view[start + FRAME_HEADER_BYTES : frame_end])
        if not partial:
            self._frame_since = None
        elif self._frame_since is None:
            self._frame_since = self.server.loop_time()
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start and RECV_BUFFER_BYTES - self._end < _PUT_PREFIX:
            self._compact()
        if self._fetch_blocked():
            self._update_reading()

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
            self.server.log.warning(
                "PUT bad header", "PUT from %s with a bad block header: %s", self.peer, exc
            )
            self._reject_put(header, Status.BAD_REQUEST)
            return True
        if BLOCK_HEADER_BYTES + block.payload_nbytes != length:
            self._reject_put(header, Status.BAD_REQUEST)
            return True
        if length > self.server.config.max_block_bytes:
            self._reject_put(header, Status.TOO_LARGE)
            return True
        if not auth.allowed(self.auth.identity, Op.PUT):
            self._reject_put(header, Status.FORBIDDEN)
            return True
        result = self.node.begin_put(block.key, length)
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
        self._payload_started_at = self.server.loop_time()
        return True

    def _finish_put(self, header: FrameHeader, block: BlockHeader, pending: PendingPut) -> None:
        self._pending = None
        if not verify(block, pending.view[BLOCK_HEADER_BYTES:]):
            self.node.revoke(pending)
            self.server.log.warning(
                "PUT checksum", "PUT from %s failed its checksum; block dropped", self.peer
            )
            self.write(pack_frame_header(Op.PUT, header.request_id, 0, 0, Status.CORRUPT))
            return
        self.node.commit(pending)
        self.tiers.note_commit(pending.key)
        self.server.note_changed([block.key])
        if not self.tiers.write_through:
            self.write(pack_frame_header(Op.PUT, header.request_id, 0, 0, Status.OK))
            return
        # Write-through: the OK keeps its place in line until the block is on SSD.
        reply = self.park()

        def persisted(future: asyncio.Future[bool]) -> None:
            status = Status.OK if future.result() else Status.FULL
            self.fill(reply, [pack_frame_header(Op.PUT, header.request_id, 0, 0, status)])

        self.tiers.persisted(pending.key).add_done_callback(persisted)

    def _reject_put(self, header: FrameHeader, status: Status) -> None:
        """Skip a PUT's payload (now or as it arrives), then answer ``status``."""
        reply = pack_frame_header(Op.PUT, header.request_id, 0, 0, status)
        body = self._start + FRAME_HEADER_BYTES
        have = min(self._end - body, header.payload_len)
        self._start = body + have
        left = header.payload_len - have
        if not left:
            self.write(reply)
            return
        self._start = self._end = 0
        self._discard_left, self._discard_reply = left, reply
        self._payload_started_at = self.server.loop_time()

    def _dispatch(self, header: FrameHeader, payload: memoryview) -> None:
        if not auth.allowed(self.auth.identity, header.opcode):
            auth.forbidden(self, header, payload)
            return
        HANDLERS[header.opcode](self, header, payload)

    # -- replies, in request order ---------------------------------------------------------------

    def park(self) -> Reply:
        """A reply that keeps its place in line until :meth:`fill` gives it its bytes."""
        reply = Reply([], ready=False)
        self.queued.append(reply)
        return reply

    def fill(self, reply: Reply, parts: list[bytes | memoryview]) -> None:
        """Complete a parked reply, send what is ready, and parse again."""
        reply.parts, reply.ready = parts, True
        self.flush_replies()
        self.resume()

    def block_reply(self, request_id: int, lease: Lease, tier: Tier) -> Reply:
        """A GET response written from the arena (a view, no copy) under ``lease``."""
        header = pack_frame_header(Op.GET, request_id, int(tier), lease.nbytes)
        return Reply([header, lease.view], lease)

    def shm_reply(self, request_id: int, lease: Lease, tier: Tier) -> bytes:
        """A GET_SHM response; the lease stays held until the client's RELEASE (or FULL, the
        lease released at once, beyond the pin limits)."""
        pin = self.may_pin(lease.nbytes, self.server.pinned_bytes(), at_least_one=True)
        if pin is not Pin.OK:
            self.node.release(lease)
            return pack_frame_header(Op.GET_SHM, request_id, 0, 0, Status.FULL)
        self.shm_leases[lease.lease_id] = lease
        self.shm_leased_bytes += lease.nbytes
        self.server.transfers.leased_bytes += lease.nbytes
        self._shm_leased_at[lease.lease_id] = self.server.loop_time()
        body = SHM_LEASE.pack(lease.lease_id, lease.offset, lease.nbytes)
        return pack_frame_header(Op.GET_SHM, request_id, int(tier), len(body)) + body

    def start_fetch(self, op: Op, request_id: int, key: bytes) -> None:
        """Read ``key`` from SSD in the background; its response keeps its place in line."""
        reply = self.park()
        task = asyncio.get_running_loop().create_task(self.tiers.fetch(key))
        self.fetches.add(task)
        task.add_done_callback(functools.partial(self._fetch_done, reply, op, request_id))

    def _fetch_done(
        self, reply: Reply, op: Op, request_id: int, task: asyncio.Task[Lease | None]
    ) -> None:
        self.fetches.discard(task)
        lease: Lease | None = None
        if not task.cancelled():
            if task.exception() is not None:
                logger.error("SSD fetch failed", exc_info=task.exception())
            else:
                lease = task.result()
        if self.closed:
            if lease is not None:
                self.node.release(lease)
            return
        if lease is None:
            reply.parts = [pack_frame_header(op, request_id, 0, 0, Status.MISS)]
        elif op is Op.GET:
            filled = self.block_reply(request_id, lease, Tier.SSD)
            reply.parts, reply.lease = filled.parts, filled.lease
        else:
            reply.parts = [self.shm_reply(request_id, lease, Tier.SSD)]
        self.fill(reply, reply.parts)

    def flush_replies(self) -> None:
        """Write the responses at the head of the line that are ready."""
        replies = self.queued
        while replies and replies[0].ready and not self._write_paused and not self.closed:
            self._transmit(replies.popleft())

    def send(self, reply: Reply) -> None:
        if self.queued:
            self.queued.append(reply)  # behind a pending SSD read
            self.flush_replies()
        else:
            self._transmit(reply)

    def _transmit(self, reply: Reply) -> None:
        if self._transport is None or self.closed:
            if reply.lease is not None:
                self.node.release(reply.lease)
            return
        self._transport.writelines(reply.parts)
        self._last_progress = self.server.loop_time()
        self.server.transfers.bytes_sent += sum(
            part.nbytes if isinstance(part, memoryview) else len(part) for part in reply.parts
        )
        if reply.lease is None:
            return
        # TLS: the SSL layer has encrypted (copied) the block in writelines; nothing refers to
        # the arena any more. Plain TCP: the transport may still hold a view of it.
        if self.server.tls is None and self._transport.get_write_buffer_size():
            self._unsent_leases.append(reply.lease)  # released by resume_writing/connection_lost
        else:
            self.node.release(reply.lease)

    def write_json(self, op: Op, request_id: int, value: object) -> None:
        body = json.dumps(value, sort_keys=True).encode()
        self.write(pack_frame_header(op, request_id, 0, len(body)) + body)

    def write(self, data: bytes) -> None:
        self.send(Reply([data]))
