"""The op → handler table of a connection, and the handlers of the block and node ops.

Every frame a connection parses is dispatched through :data:`HANDLERS` (the transport ops'
handlers are in :mod:`kvstore.server.transfer`). A handler answers with ``conn.write`` /
``conn.send``, or parks a reply (``conn.park``) that an SSD read or a peer read fills later
(``conn.fill``), so that replies keep request order.

GET and GET_SHM replies carry the tier that served the block in ``count`` (1 = DRAM, 2 = SSD);
MATCH_PREFIX replies carry one byte per matched key, the fastest tier holding it. A GET that
misses here is read through from a peer that holds the block (read-through), unless the frame is
itself a peer's (``FLAG_NO_FORWARD``). A MATCH_PREFIX with a hint (``FLAG_MATCH_HINT``: the node
id the client says holds the blocks) whose keys this node's tiers and index do not all cover asks
that peer -- if it is a live member -- for the rest, its reply parked meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvstore.blocks.tier import Tier
from kvstore.node.store import Lease
from kvstore.server import auth, transfer
from kvstore.server.limits import MAX_SHM_LEASES_PER_CONNECTION, split_keys
from kvstore.wire.frame import (
    FLAG_MATCH_HINT,
    KEY_BYTES,
    FrameError,
    FrameHeader,
    Op,
    Status,
    pack_frame_header,
)
from kvstore.wire.messages import LEASE_ID, decode_match_hint, encode_bitmap

if TYPE_CHECKING:
    from kvstore.server.connection import Connection, Reply

__all__ = ["HANDLERS", "Handler"]

Handler = Callable[["Connection", FrameHeader, memoryview], None]
"""Handles one well-framed request (its header and payload) on a connection."""


def get(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    request_id, key = header.request_id, bytes(payload)
    found = conn.tiers.acquire(key)
    if isinstance(found, Lease):
        conn.send(conn.block_reply(request_id, found, Tier.DRAM))
    elif found is Tier.SSD:
        conn.start_fetch(Op.GET, request_id, key)
    elif not conn.no_forward and conn.server.peers_holding(key):
        _start_remote_fetch(conn, request_id, key)
    else:
        conn.write(pack_frame_header(Op.GET, request_id, 0, 0, Status.MISS))


def _start_remote_fetch(conn: Connection, request_id: int, key: bytes) -> None:
    """Read ``key`` from a peer on a thread (read-through); its response keeps its place."""
    reply = conn.park()
    future = conn.server.fetch_remote(key)
    conn.remote_fetches.add(future)
    future.add_done_callback(functools.partial(_remote_done, conn, reply, request_id))


def _remote_done(
    conn: Connection,
    reply: Reply,
    request_id: int,
    future: asyncio.Future[tuple[bytes, int] | None],
) -> None:
    conn.remote_fetches.discard(future)
    found: tuple[bytes, int] | None = None
    if not future.cancelled():
        if future.exception() is not None:
            conn.server.log.warning(
                "read-through failed", "read-through failed: %s", future.exception()
            )
        else:
            found = future.result()
    if found is not None:  # moved across the network, whatever becomes of the reply
        conn.server.transfers.read_through_bytes += len(found[0])
    if conn.closed:
        return
    if found is None:
        conn.fill(reply, [pack_frame_header(Op.GET, request_id, 0, 0, Status.MISS)])
    else:
        block, tier = found
        conn.server.transfers.read_through_blocks += 1
        conn.fill(reply, [pack_frame_header(Op.GET, request_id, tier, len(block)), block])


def get_shm(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    request_id, key = header.request_id, bytes(payload)
    if len(conn.shm_leases) + len(conn.fetches) >= MAX_SHM_LEASES_PER_CONNECTION:
        conn.server.log.warning(
            "too many leases", "%s holds too many shared-memory leases", conn.peer
        )
        conn.write(pack_frame_header(Op.GET_SHM, request_id, 0, 0, Status.BAD_REQUEST))
        return
    found = conn.tiers.acquire(key)
    if isinstance(found, Lease):
        conn.write(conn.shm_reply(request_id, found, Tier.DRAM))
    elif found is Tier.SSD:
        conn.start_fetch(Op.GET_SHM, request_id, key)
    else:
        conn.write(pack_frame_header(Op.GET_SHM, request_id, 0, 0, Status.MISS))


def match_prefix(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    """The leading keys this node can serve: those its tiers hold, then (a client's request,
    not a peer's) those live peers hold by the index, then those the hinted peer holds."""
    keys_end = header.count * KEY_BYTES
    keys = split_keys(payload[:keys_end])
    hint = None
    if header.flags & FLAG_MATCH_HINT:
        try:
            hint = decode_match_hint(payload[keys_end:])
        except ValueError as exc:
            raise FrameError(f"bad MATCH_PREFIX hint: {exc}") from None
    found: list[Tier] = conn.tiers.match_prefix(keys)
    if len(found) < len(keys) and not conn.no_forward:
        found += conn.server.peer_prefix(keys[len(found) :])
        if len(found) < len(keys) and hint is not None:
            endpoint = conn.server.hinted_peer(hint)
            if endpoint is not None:
                _start_hinted_match(conn, header.request_id, keys, found, hint, endpoint)
                return
            conn.server.transfers.hints_ignored += 1
    conn.write(_match_reply(header.request_id, found))


def _match_reply(request_id: int, found: list[Tier]) -> bytes:
    tiers = bytes(found)
    return pack_frame_header(Op.MATCH_PREFIX, request_id, len(tiers), len(tiers)) + tiers


def _start_hinted_match(
    conn: Connection,
    request_id: int,
    keys: list[bytes],
    found: list[Tier],
    hint: str,
    endpoint: str,
) -> None:
    """Ask the hinted peer for ``keys`` past ``found`` on a thread; the reply keeps its place
    and is ``found`` extended by what the peer holds (nothing on a timeout or an error)."""
    reply = conn.park()
    counters = conn.server.transfers
    counters.hint_lookups += 1
    future = conn.server.match_hinted(hint, endpoint, keys[len(found) :])
    conn.remote_fetches.add(future)

    def done(future: asyncio.Future[list[Tier]]) -> None:
        conn.remote_fetches.discard(future)
        more: list[Tier] = []
        if not future.cancelled():
            if future.exception() is not None:
                counters.hint_failures += 1
                conn.server.log.warning(
                    "hinted match failed",
                    "MATCH_PREFIX of hinted peer %s (%s) failed: %s",
                    hint,
                    endpoint,
                    future.exception(),
                )
            else:
                more = future.result()
                counters.hint_blocks += len(more)
        if not conn.closed:
            conn.fill(reply, [_match_reply(request_id, [*found, *more])])

    future.add_done_callback(done)


def exists(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    bitmap = encode_bitmap(conn.tiers.exists(split_keys(payload)))
    reply = pack_frame_header(Op.EXISTS, header.request_id, header.count, len(bitmap))
    conn.write(reply + bitmap)


def delete(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    keys = split_keys(payload)
    deleted = conn.tiers.delete(keys)
    conn.server.note_changed(keys)
    conn.write(pack_frame_header(Op.DELETE, header.request_id, deleted, 0))


def stats(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    conn.write_json(Op.STATS, header.request_id, conn.server.stats())


def shm_info(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    conn.write_json(Op.SHM_INFO, header.request_id, conn.server.shm_info())


def release(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    unknown: list[int] = []
    for (lease_id,) in LEASE_ID.iter_unpack(payload):
        lease = conn.shm_leases.pop(lease_id, None)
        if lease is None:
            unknown.append(lease_id)
        else:
            conn.shm_leased_bytes -= lease.nbytes
            conn.node.release(lease)
    if unknown:  # one line per frame, and few of those (the log is rate-limited)
        conn.server.log.warning(
            "RELEASE unknown lease",
            "RELEASE from %s of %d unknown lease(s), e.g. %d",
            conn.peer,
            len(unknown),
            unknown[0],
        )


HANDLERS: dict[Op, Handler] = {
    Op.GET: get,
    Op.MATCH_PREFIX: match_prefix,
    Op.EXISTS: exists,
    Op.DELETE: delete,
    Op.STATS: stats,
    Op.SHM_INFO: shm_info,
    Op.GET_SHM: get_shm,
    Op.RELEASE: release,
    Op.LEASE_BATCH: transfer.lease_batch,
    Op.RELEASE_BATCH: transfer.release_batch,
    Op.RESERVE_BATCH: transfer.reserve_batch,
    Op.COMMIT_BATCH: transfer.commit_batch,
    Op.RDMA_CONNECT: transfer.rdma_connect,
    **auth.HANDLERS,
}
"""Every op but PUT, whose payload the connection receives straight into the arena."""
