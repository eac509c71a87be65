"""The transport ops of a connection: batched leases and reservations, RDMA_CONNECT.

``LEASE_BATCH`` pins a batch of blocks under one batch id and answers where each one is in the
arena (SSD blocks are first read into the arena, the reply waiting in line like a GET's);
``RELEASE_BATCH`` unpins them. ``RESERVE_BATCH`` is the first phase of a batch of puts (space
reserved, blocks invisible), the client writes the blocks into the arena itself, and
``COMMIT_BATCH`` verifies every block's header and commits it (or revokes it: ``CORRUPT``). A
connection may hold at most ``MAX_SHM_LEASES_PER_CONNECTION`` leases and reserve at most a quarter
of the arena at once: a bigger RESERVE_BATCH is refused whole (``FULL``, and the client sends
those blocks over TCP, one reservation at a time); an open reservation counts as a payload in
flight for the put timeout. ``RDMA_CONNECT`` connects a queue pair to the registered arena
(kvstore.transport.rdma) or answers ``UNSUPPORTED`` with the reason. What a connection holds lives
in its :class:`TransferState`, released with the connection (:meth:`TransferState.release_all`):
a lease batch that pinned nothing is not kept (releasing it is a no-op), and at most
``MAX_OPEN_PUT_BATCHES`` reservations may be open at once (beyond: ``BAD_REQUEST``), so a client
that never releases or commits holds a bounded amount of state.

Leases and reservations pin arena space, so they are held to the server's pin limits
(:class:`kvstore.server.limits.PinLimits`): a block of a LEASE_BATCH beyond the connection's share
is answered ``LEASE_DEFERRED`` (the client asks again once it has released its earlier batch;
a connection holding nothing always gets one block), one beyond the node-wide cap
``LEASE_REFUSED`` (the client reads it over TCP); a RESERVE_BATCH beyond either is answered
``FULL`` (the client streams those blocks as PUTs, one reservation at a time).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstore.blocks.format import BLOCK_HEADER_BYTES, BlockFormatError, BlockHeader, verify
from kvstore.blocks.tier import Tier
from kvstore.node.store import Lease, PendingPut, StoreNode
from kvstore.server.limits import (
    MAX_OPEN_PUT_BATCHES,
    MAX_SHM_LEASES_PER_CONNECTION,
    Pin,
    split_keys,
)
from kvstore.wire.frame import FrameError, FrameHeader, Op, Status, pack_frame_header
from kvstore.wire.messages import (
    BATCH_ID,
    LEASE_DEFERRED,
    LEASE_REFUSED,
    RESERVE_ITEM,
    LeaseBatchReply,
    RdmaEndpointInfo,
    ReserveBatchReply,
)
from kvstore.wire.replies import MAX_REASON_BYTES
from kvstore.wire.types import PutStatus

if TYPE_CHECKING:
    from kvstore.server.connection import Connection

__all__ = [
    "TransferCounters",
    "TransferState",
    "commit_batch",
    "lease_batch",
    "rdma_connect",
    "release_batch",
    "reserve_batch",
]

logger = logging.getLogger("kvstore.server")

MAX_SSD_READS_PER_BATCH = 8
"""SSD blocks one LEASE_BATCH reads into the arena (the rest are answered LEASE_DEFERRED)."""
MAX_REMOTE_READS_PER_BATCH = 32
"""Blocks one LEASE_BATCH reads through from peers into the arena (the rest: LEASE_DEFERRED)."""


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
    read_through_blocks: int = 0
    """Blocks read through from a peer (GET, and LEASE_BATCH into the arena)."""
    hint_lookups: int = 0
    """MATCH_PREFIXes that asked the peer their hint names (their keys were not all covered
    by this node's tiers and index)."""
    hint_blocks: int = 0
    """Blocks those peers answered they hold, beyond what the tiers and index covered."""
    hint_failures: int = 0
    """Hinted peers that did not answer in time (``--hint-timeout``) or failed: no extension."""
    hints_ignored: int = 0
    """Hints that were needed but named no live peer (an unknown or dead node, or this one)."""
    reserve_batches: int = 0
    reserve_batches_refused: int = 0
    reserved_blocks: int = 0
    committed_blocks: int = 0
    corrupt_blocks: int = 0
    rdma_connections: int = 0
    lease_timeouts: int = 0
    """Connections closed for holding a lease past ``lease_timeout_s``."""
    bytes_received: int = 0
    """Bytes read on the node's connections: its clients' and its peers' requests, PUT payloads
    (after TLS decryption). Blocks this node reads through from peers: ``read_through_bytes``."""
    bytes_sent: int = 0
    """Bytes written on the node's connections: replies, GET payloads (before TLS encryption)."""
    leased_bytes: int = 0
    """Block bytes leased to readers that copy them out of the arena themselves (GET_SHM and
    LEASE_BATCH: shared memory or RDMA); no socket carries them."""
    committed_bytes: int = 0
    """Block bytes writers put straight into the arena (RESERVE_BATCH, then COMMIT_BATCH)."""
    read_through_bytes: int = 0
    """Block bytes read from peers (whether or not the block was then kept or sent on)."""


@dataclass(slots=True)
class TransferState:
    """What one connection holds through the transport ops: leases and reservations per batch
    id, the SSD reads of pending LEASE_BATCHes, its RDMA queue pair."""

    batch_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    last_batch_id: int = 0
    """The last batch id this connection was given (a LEASE_BATCH or a RESERVE_BATCH)."""
    lease_batches: dict[int, list[Lease]] = field(default_factory=dict)
    leased_at: dict[int, float] = field(default_factory=dict)
    """Loop time each lease batch was granted (the lease-timeout reaper reads the oldest)."""
    num_batch_leases: int = 0
    leased_bytes: int = 0
    put_batches: dict[int, list[_Reserved]] = field(default_factory=dict)
    reserved_bytes: int = 0
    reserved_since: float | None = None
    batch_fetches: set[asyncio.Future[dict[int, tuple[Lease, Tier]]]] = field(default_factory=set)
    rdma: object | None = None

    def new_batch_id(self) -> int:
        self.last_batch_id = next(self.batch_ids)
        return self.last_batch_id

    def release_all(self, node: StoreNode, drop_rdma: Callable[[object], None]) -> None:
        """The connection is gone: release its leases, revoke its reservations, drop its QP."""
        for leases in self.lease_batches.values():
            for lease in leases:
                node.release(lease)
        self.lease_batches.clear()
        self.leased_at.clear()
        self.num_batch_leases = self.leased_bytes = 0
        for reserved in self.put_batches.values():
            for entry in reserved:
                if entry.pending is not None:
                    node.revoke(entry.pending)
        self.put_batches.clear()
        self.reserved_bytes = 0
        if self.rdma is not None:
            drop_rdma(self.rdma)
            self.rdma = None


def lease_batch(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    request_id, keys = header.request_id, split_keys(payload)
    state = conn.transfer
    held = len(conn.shm_leases) + state.num_batch_leases
    if held + len(keys) > MAX_SHM_LEASES_PER_CONNECTION:
        conn.server.log.warning(
            "too many leases", "%s holds too many shared-memory leases", conn.peer
        )
        conn.write(pack_frame_header(Op.LEASE_BATCH, request_id, 0, 0, Status.BAD_REQUEST))
        return
    found: list[Lease | None] = []
    tiers = bytearray(len(keys))
    on_ssd: list[int] = []
    remote: list[int] = []  # missed here, held by a peer: read through into the arena
    forward = not conn.no_forward
    for i, key in enumerate(keys):
        result = conn.tiers.acquire(key)
        if isinstance(result, Lease):
            found.append(result)
            tiers[i] = Tier.DRAM
        else:
            found.append(None)
            if result is Tier.SSD and len(on_ssd) < MAX_SSD_READS_PER_BATCH:
                on_ssd.append(i)
            elif result is Tier.SSD:
                tiers[i] = LEASE_DEFERRED
            elif forward and conn.server.peers_holding(key):
                if len(remote) < MAX_REMOTE_READS_PER_BATCH:
                    remote.append(i)
                else:
                    tiers[i] = LEASE_DEFERRED
    counters = conn.server.transfers
    counters.lease_batches += 1
    if not on_ssd and not remote:
        conn.write(_lease_batch_reply(conn, request_id, found, tiers))
        return
    # Read the SSD and the peers' blocks into the arena first; the reply keeps its place.
    reply = conn.park()
    fetched = asyncio.ensure_future(_fetch_into_arena(conn, keys, on_ssd, remote))
    state.batch_fetches.add(fetched)

    def done(future: asyncio.Future[dict[int, tuple[Lease, Tier]]]) -> None:
        state.batch_fetches.discard(future)
        got: dict[int, tuple[Lease, Tier]] = {}
        if not future.cancelled() and future.exception() is None:
            got = future.result()
        elif not future.cancelled():
            logger.error("reading a LEASE_BATCH's blocks failed", exc_info=future.exception())
        for i in (*on_ssd, *remote):
            lease, tier = got.get(i, (None, 0))
            found[i] = lease
            tiers[i] = tier
        if conn.closed:
            for lease in found:
                if lease is not None:
                    conn.node.release(lease)
            return
        conn.fill(reply, [_lease_batch_reply(conn, request_id, found, tiers)])

    fetched.add_done_callback(done)


async def _fetch_into_arena(
    conn: Connection, keys: list[bytes], on_ssd: list[int], remote: list[int]
) -> dict[int, tuple[Lease, Tier]]:
    """Lease the batch's blocks that are not in this node's DRAM: the SSD ones read into the
    arena, the ones peers hold read through (one pipelined round trip per peer) and stored here
    (announced: later requests on this host hit them here). By index in ``keys``."""
    loop = asyncio.get_running_loop()
    from_peers: asyncio.Future[list[tuple[bytes, int] | None]] = loop.create_future()
    if remote:
        from_peers = conn.server.fetch_remote_many([keys[i] for i in remote])
    else:
        from_peers.set_result([])
    ssd_leases, blocks = await asyncio.gather(
        asyncio.gather(*(conn.tiers.fetch(keys[i]) for i in on_ssd)), from_peers
    )
    got: dict[int, tuple[Lease, Tier]] = {}
    for i, lease in zip(on_ssd, ssd_leases, strict=True):
        if lease is not None:
            got[i] = (lease, Tier.SSD)
    for i, block in zip(remote, blocks, strict=True):
        if block is not None:  # moved across the network, whatever becomes of it here
            conn.server.transfers.read_through_bytes += len(block[0])
        if block is None or not conn.server.keep_copy(keys[i], block[0]):
            continue
        lease = conn.node.pin(keys[i])  # the read counts as a peer's hit, not a DRAM one
        if lease is not None:
            got[i] = (lease, Tier.DRAM)
            conn.server.transfers.read_through_blocks += 1
    return got


def _lease_batch_reply(
    conn: Connection, request_id: int, found: list[Lease | None], tiers: bytearray
) -> bytes:
    state = conn.transfer
    batch_id = state.new_batch_id()
    node_pinned = conn.server.pinned_bytes()
    for i, lease in enumerate(found):
        if lease is None:
            continue
        pin = conn.may_pin(lease.nbytes, node_pinned, at_least_one=True)
        if pin is Pin.OK:
            state.leased_bytes += lease.nbytes
            node_pinned += lease.nbytes
            continue
        conn.node.release(lease)
        found[i] = None
        tiers[i] = LEASE_DEFERRED if pin is Pin.DEFER else LEASE_REFUSED
    leases = [lease for lease in found if lease is not None]
    if leases:  # a batch that pins nothing holds nothing: its RELEASE_BATCH is a no-op
        state.lease_batches[batch_id] = leases
        state.leased_at[batch_id] = conn.server.loop_time()
    state.num_batch_leases += len(leases)
    conn.server.transfers.batch_leased_blocks += len(leases)
    conn.server.transfers.leased_bytes += sum(lease.nbytes for lease in leases)
    spans = tuple((0, 0) if f is None else (f.offset, f.nbytes) for f in found)
    body = LeaseBatchReply(batch_id, spans, bytes(tiers)).encode()
    return pack_frame_header(Op.LEASE_BATCH, request_id, len(found), len(body)) + body


def release_batch(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    state = conn.transfer
    unknown: list[int] = []
    for (batch_id,) in BATCH_ID.iter_unpack(payload):
        leases = state.lease_batches.pop(batch_id, None)
        state.leased_at.pop(batch_id, None)
        if leases is None:
            if batch_id > state.last_batch_id:  # else released already, or it leased nothing
                unknown.append(batch_id)
            continue
        state.num_batch_leases -= len(leases)
        for lease in leases:
            state.leased_bytes -= lease.nbytes
            conn.node.release(lease)
    if unknown:  # one line per frame, and few of those (the log is rate-limited)
        conn.server.log.warning(
            "RELEASE_BATCH unknown batch",
            "RELEASE_BATCH from %s of %d unknown batch(es), e.g. %d",
            conn.peer,
            len(unknown),
            unknown[0],
        )


def reserve_batch(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    request_id, state = header.request_id, conn.transfer
    items = list(RESERVE_ITEM.iter_unpack(payload))
    counters = conn.server.transfers
    counters.reserve_batches += 1
    if len(state.put_batches) >= MAX_OPEN_PUT_BATCHES:
        conn.server.log.warning(
            "too many open put batches",
            "%s has %d RESERVE_BATCHes open (at most %d): refused",
            conn.peer,
            len(state.put_batches),
            MAX_OPEN_PUT_BATCHES,
        )
        conn.write(pack_frame_header(Op.RESERVE_BATCH, request_id, 0, 0, Status.BAD_REQUEST))
        return
    wanted = sum(nbytes for _, nbytes in items)
    if conn.may_pin(wanted, conn.server.pinned_bytes(), at_least_one=False) is not Pin.OK:
        counters.reserve_batches_refused += 1
        conn.write(pack_frame_header(Op.RESERVE_BATCH, request_id, 0, 0, Status.FULL))
        return
    max_bytes = conn.server.config.max_block_bytes
    arena = conn.node.arena
    reserved: list[_Reserved] = []
    offsets: list[int] = []
    for key, nbytes in items:
        entry = _Reserved(Status.BAD_REQUEST, key, nbytes, None)
        reserved.append(entry)
        if nbytes > max_bytes:
            entry.status = Status.TOO_LARGE
        elif nbytes >= BLOCK_HEADER_BYTES:
            result = conn.node.begin_put(key, nbytes)
            if isinstance(result, PutStatus):
                entry.status = Status(result)
            else:
                entry.status, entry.pending = Status.OK, result
                state.reserved_bytes += nbytes
                counters.reserved_blocks += 1
                offsets.append(arena.offset_of(result.view))
                continue
        offsets.append(0)
    batch_id = state.new_batch_id()
    state.put_batches[batch_id] = reserved
    if state.reserved_since is None:
        state.reserved_since = conn.server.loop_time()
    statuses = bytes(entry.status for entry in reserved)
    body = ReserveBatchReply(batch_id, tuple(offsets), statuses).encode()
    conn.write(pack_frame_header(Op.RESERVE_BATCH, request_id, len(items), len(body)) + body)


def commit_batch(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    request_id, state = header.request_id, conn.transfer
    (batch_id,) = BATCH_ID.unpack(payload)
    reserved = state.put_batches.pop(batch_id, None)
    if reserved is None:
        conn.server.log.warning(
            "COMMIT_BATCH unknown batch",
            "COMMIT_BATCH of unknown batch %d from %s",
            batch_id,
            conn.peer,
        )
        conn.write(pack_frame_header(Op.COMMIT_BATCH, request_id, 0, 0, Status.BAD_REQUEST))
        return
    if not state.put_batches:
        state.reserved_since = None
    counters = conn.server.transfers
    statuses = bytearray()
    committed: list[bytes] = []
    for entry in reserved:
        pending = entry.pending
        if pending is None:
            statuses.append(entry.status)
            continue
        state.reserved_bytes -= pending.nbytes
        if _written_block_ok(conn, entry, pending):
            conn.node.commit(pending)
            conn.tiers.note_commit(pending.key)
            committed.append(pending.key)
            counters.committed_blocks += 1
            counters.committed_bytes += pending.nbytes
            statuses.append(Status.OK)
        else:
            conn.node.revoke(pending)
            counters.corrupt_blocks += 1
            statuses.append(Status.CORRUPT)
    if committed:
        conn.server.note_changed(committed)
    if Status.CORRUPT in statuses:  # one line per frame, and few of those (rate-limited)
        conn.server.log.warning(
            "COMMIT_BATCH bad header",
            "COMMIT_BATCH from %s: %d block(s) written with a bad header",
            conn.peer,
            statuses.count(Status.CORRUPT),
        )
    head = pack_frame_header(Op.COMMIT_BATCH, request_id, len(statuses), len(statuses))
    if not committed or not conn.tiers.write_through:
        conn.write(head + bytes(statuses))
        return
    # Write-through: the reply keeps its place in line until the committed blocks are on SSD;
    # one that could not get there is FULL.
    parked = conn.park()
    waits = [
        (i, conn.tiers.persisted(entry.key))
        for i, entry in enumerate(reserved)
        if statuses[i] == Status.OK
    ]
    left = [len(waits)]

    def persisted(_: object) -> None:
        left[0] -= 1
        if left[0]:
            return
        for i, future in waits:
            if not future.result():
                statuses[i] = Status.FULL
        conn.fill(parked, [head + bytes(statuses)])

    for _, future in waits:
        future.add_done_callback(persisted)


def _written_block_ok(conn: Connection, entry: _Reserved, pending: PendingPut) -> bool:
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
    return conn.transfer.rdma is None or verify(block, view[BLOCK_HEADER_BYTES:])


def rdma_connect(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    request_id = header.request_id
    try:
        client = RdmaEndpointInfo.decode(payload)
    except ValueError as exc:
        raise FrameError(f"bad RDMA_CONNECT: {exc}") from None
    endpoint = conn.server.rdma_endpoint()
    reason = endpoint if isinstance(endpoint, str) else ""
    if not reason and conn.transfer.rdma is not None:
        reason = "this connection already has an RDMA queue pair"
    if not reason:
        assert not isinstance(endpoint, str) and endpoint is not None
        try:
            conn.transfer.rdma, info = endpoint.accept(client)
        except Exception as exc:  # verbs errors: answer, keep the connection (it is TCP)
            reason = f"cannot connect a queue pair: {exc}"
        else:
            conn.server.transfers.rdma_connections += 1
            body = info.encode()
            conn.write(pack_frame_header(Op.RDMA_CONNECT, request_id, 0, len(body)) + body)
            return
    text = reason.encode()[:MAX_REASON_BYTES]  # what a client reads of it (wire.replies)
    conn.write(
        pack_frame_header(Op.RDMA_CONNECT, request_id, 0, len(text), Status.UNSUPPORTED) + text
    )
