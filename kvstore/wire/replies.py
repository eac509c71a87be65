"""What a reply means: one mapping from reply statuses and malformed replies to results and errors.

Both clients (:mod:`kvstore.client.sync`, :mod:`kvstore.client.aio`) and the peer fetcher call these
functions on the frames they received, so the same reply gives the same result or the same
exception everywhere. No I/O: each function looks at bytes already received and either returns
the typed result or raises the :mod:`kvstore.errors` exception that reply stands for.

Which error is which:

* a frame header that cannot be parsed, or a reply to another request:
  :class:`KVStoreError` (the connection is out of step: the caller drops it);
* a reply header claiming a payload longer than any reply to that request can be
  (:func:`reply_limit`: a count beyond what was asked, a block beyond the client's
  ``max_block_bytes``): :class:`KVStoreCorruptError`, raised before anything is allocated for it
  (the caller drops the connection: its payload is never read);
* a status other than the op's success statuses: :class:`KVStoreError` (``"OP failed (status
  N)"``), or for a PUT see :func:`put_status`;
* a reply whose body contradicts its frame or the request (a block header that does not parse,
  names another key or disagrees with the frame on the length; a bitmap or batch reply of the
  wrong length) or a block that fails its checksum: :class:`KVStoreCorruptError`;
* a block larger than the caller's buffer: :class:`KVStoreError`.
"""

from __future__ import annotations

import json
from typing import Any

from kvstore.blocks.format import BLOCK_HEADER_BYTES, BlockFormatError, BlockHeader
from kvstore.blocks.tier import Tier
from kvstore.errors import KVStoreAuthError, KVStoreCorruptError, KVStoreError
from kvstore.wire.frame import (
    DEFAULT_MAX_BLOCK_BYTES,
    MAX_BATCH_ITEMS,
    FrameError,
    FrameHeader,
    Op,
    Status,
)
from kvstore.wire.messages import (
    BATCH_ID,
    HELLO_REPLY_BYTES,
    LEASE_SPAN,
    RDMA_INFO,
    RESERVE_OFFSET,
    SHM_LEASE,
    LeaseBatchReply,
    ReserveBatchReply,
    decode_bitmap,
)
from kvstore.wire.types import PutStatus

__all__ = [
    "block_too_large",
    "check_ok",
    "corrupt_block",
    "decode_block_header",
    "decode_delete",
    "decode_exists",
    "decode_json",
    "decode_lease_batch",
    "decode_match_tiers",
    "decode_reply_header",
    "decode_reserve_batch",
    "get_hit",
    "put_status",
    "reply_limit",
]

MAX_JSON_REPLY = 1 << 20
"""Largest STATS / SHM_INFO reply a client reads (a node's is a few KiB)."""
MAX_REASON_BYTES = 4096
"""Largest reason text of an UNSUPPORTED reply (RDMA_CONNECT); a node truncates longer ones."""


def reply_limit(op: Op, asked: int, max_block_bytes: int) -> int:
    """The longest payload a reply to a request of ``op`` with ``asked`` keys (blocks, ids) can
    carry; ``max_block_bytes`` bounds a GET's block (header + data)."""
    if op is Op.GET:
        return max_block_bytes
    if op is Op.MATCH_PREFIX:
        return asked  # one tier byte per matched key
    if op is Op.EXISTS:
        return (asked + 7) // 8
    if op is Op.STATS or op is Op.SHM_INFO:
        return MAX_JSON_REPLY
    if op is Op.GET_SHM:
        return SHM_LEASE.size
    if op is Op.LEASE_BATCH:
        return BATCH_ID.size + asked * (LEASE_SPAN.size + 1)
    if op is Op.RESERVE_BATCH:
        return BATCH_ID.size + asked * (RESERVE_OFFSET.size + 1)
    if op is Op.COMMIT_BATCH:
        return min(asked, MAX_BATCH_ITEMS)  # a status byte per block of the reservation
    if op is Op.RDMA_CONNECT:
        return max(RDMA_INFO.size, MAX_REASON_BYTES)
    if op is Op.HELLO:
        return HELLO_REPLY_BYTES
    return 0  # PUT, DELETE, HELLO_PROOF (and RELEASE, RELEASE_BATCH, which have no reply)


def decode_reply_header(
    buf: bytes | bytearray | memoryview,
    offset: int,
    request_id: int,
    op: Op,
    *,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    asked: int = 1,
) -> FrameHeader:
    """The header of the reply to request ``request_id`` of ``op`` with ``asked`` keys; its
    payload length is checked against :func:`reply_limit` before the caller reads a byte of it."""
    try:
        header = FrameHeader.decode(buf, offset)
    except FrameError as exc:
        raise KVStoreError(f"garbled reply from the node: {exc}") from exc
    if header.status == Status.UNAUTHENTICATED:
        raise KVStoreAuthError(
            "the node requires cluster credentials this client does not have or it refused them "
            "(give the client the node's cluster key: --cluster-key-file)"
        )
    if header.status == Status.FORBIDDEN:
        raise KVStoreAuthError(f"this client's role may not use {header.opcode.name}")
    if header.request_id != request_id or header.opcode is not op:
        raise KVStoreError(
            f"reply {header.opcode.name}/{header.request_id} while waiting for "
            f"{op.name}/{request_id}"
        )
    limit = reply_limit(op, asked, max_block_bytes)
    if header.payload_len > limit:
        raise KVStoreCorruptError(
            f"{op.name} reply claims {header.payload_len} bytes; a reply to {asked} key(s) "
            f"has at most {limit}"
        )
    return header


def check_ok(header: FrameHeader) -> None:
    """Raise unless the reply's status is OK."""
    if header.status != Status.OK:
        raise KVStoreError(f"{header.opcode.name} failed (status {header.status})")


def put_status(status: int) -> PutStatus:
    """A PUT's (or one reserved block's) wire status as a result, or the error it stands for."""
    if status in (Status.OK, Status.EXISTS, Status.FULL):
        return PutStatus(status)
    if status == Status.CORRUPT:
        raise KVStoreCorruptError("the node received a block that failed its checksum")
    if status == Status.TOO_LARGE:
        raise KVStoreError("block is larger than the node's max_block_bytes")
    raise KVStoreError(f"the node rejected the PUT (status {status})")


def get_hit(header: FrameHeader) -> bool:
    """Whether a GET reply carries a block (False: a miss); raises for any other reply.

    After an error the reply's ``payload_len`` bytes are still to be skipped."""
    if header.status == Status.MISS:
        return False
    if header.status != Status.OK or header.payload_len < BLOCK_HEADER_BYTES:
        raise KVStoreError(f"unexpected GET reply (status {header.status})")
    return True


def decode_block_header(
    raw: bytes | bytearray | memoryview, payload_len: int, key: bytes
) -> BlockHeader:
    """The block header at the start of a GET reply of ``payload_len`` bytes for ``key``.

    After an error the rest of the reply (``payload_len - BLOCK_HEADER_BYTES``) is still to be
    skipped; the connection stays in step."""
    try:
        block = BlockHeader.decode(raw)
    except BlockFormatError as exc:
        raise KVStoreCorruptError(f"bad block header from the node: {exc}", (key,)) from exc
    if block.payload_nbytes != payload_len - BLOCK_HEADER_BYTES:
        raise KVStoreCorruptError("block header and frame disagree on the length", (key,))
    if block.key != key:
        raise KVStoreCorruptError(f"asked for {key.hex()}, got {block.key.hex()}", (key,))
    return block


def block_too_large(nbytes: int, capacity: int) -> KVStoreError:
    return KVStoreError(f"block of {nbytes} bytes does not fit in {capacity} bytes")


def corrupt_block(key: bytes, why: str = "failed its checksum") -> KVStoreCorruptError:
    """A block that failed verification at the reader (``keys`` = its key)."""
    return KVStoreCorruptError(f"block {key.hex()} {why}", (key,))


def decode_match_count(header: FrameHeader, asked: int) -> int:
    """A MATCH_PREFIX reply's number of matched keys, at most the ``asked`` keys of the request."""
    check_ok(header)
    if header.count > asked:
        raise KVStoreCorruptError(f"MATCH_PREFIX reply matched {header.count} of {asked} keys")
    return header.count


def decode_match_tiers(
    header: FrameHeader, body: bytes | bytearray | memoryview, asked: int
) -> list[Tier]:
    """A MATCH_PREFIX reply: the tier of each matched key (a node without tier information
    reports every block as DRAM); at most the ``asked`` keys of the request."""
    found = decode_match_count(header, asked)
    try:
        return [Tier(code) for code in body] if len(body) == found else [Tier.DRAM] * found
    except ValueError:
        return [Tier.DRAM] * found


def decode_delete(header: FrameHeader, asked: int) -> int:
    """A DELETE reply's number of deleted keys, at most the ``asked`` keys of the request."""
    check_ok(header)
    if header.count > asked:
        raise KVStoreCorruptError(f"DELETE reply deleted {header.count} of {asked} keys")
    return header.count


def decode_exists(
    header: FrameHeader, body: bytes | bytearray | memoryview, asked: int
) -> list[bool]:
    """An EXISTS reply: one flag per key of the request (``asked`` keys)."""
    check_ok(header)
    if header.count != asked:
        raise KVStoreCorruptError(f"EXISTS reply answers {header.count} of {asked} keys")
    try:
        return decode_bitmap(body, header.count)
    except ValueError as exc:
        raise KVStoreCorruptError(f"garbled EXISTS reply: {exc}") from exc


def decode_json(header: FrameHeader, body: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A STATS or SHM_INFO reply."""
    check_ok(header)
    try:
        value = json.loads(bytes(body))
    except (ValueError, RecursionError) as exc:
        raise KVStoreCorruptError(f"garbled {header.opcode.name} reply: {exc}") from exc
    if not isinstance(value, dict):
        raise KVStoreError(f"{header.opcode.name} reply is not a JSON object")
    return value


def decode_lease_batch(
    header: FrameHeader, body: bytes | bytearray | memoryview, count: int
) -> LeaseBatchReply:
    if header.status != Status.OK:
        raise KVStoreError(f"the node refused LEASE_BATCH (status {header.status})")
    try:
        return LeaseBatchReply.decode(body, count)
    except ValueError as exc:
        raise KVStoreCorruptError(f"garbled LEASE_BATCH reply: {exc}") from exc


def decode_reserve_batch(body: bytes | bytearray | memoryview, count: int) -> ReserveBatchReply:
    try:
        return ReserveBatchReply.decode(body, count)
    except ValueError as exc:
        raise KVStoreCorruptError(f"garbled RESERVE_BATCH reply: {exc}") from exc
