"""The kvstore wire protocol's frames (TCP; version 1): header, opcodes, statuses, limits.

This module is the one owner of the frame header: nothing else packs or parses it. The payloads
of each op are in :mod:`kvstore.wire.messages`, the replies' meaning (results and errors) in
:mod:`kvstore.wire.replies`. No I/O here: the callers own their sockets.


Every message, request or response, is one frame: a fixed 24-byte header followed by
``payload_len`` bytes. A fixed header lets the server read it into a preallocated buffer, validate
it in one ``struct`` call, and then receive a PUT's payload straight into the arena extent reserved
for it -- no intermediate copy, no per-message allocation. Frame header (little-endian)::

    offset size field
     0      4   magic        b"SKVP"
     4      1   version      1
     5      1   opcode       Op
     6      1   status       Status (responses; 0 in requests)
     7      1   flags        FLAG_NO_FORWARD (a peer's request: never forwarded);
                             FLAG_MATCH_HINT (a MATCH_PREFIX whose keys a hint follows); else 0
     8      4   request_id   chosen by the client, echoed in the response
    12      4   count        number of keys in a request; op-specific result in a response
    16      8   payload_len  bytes that follow

Requests are answered in order, one response per request (except ``RELEASE``, which has none), so
a client can pipeline: send many requests, then read the responses. Payloads:

============  ===================================  ================================================
op            request payload (count)              response (status, count, payload)
============  ===================================  ================================================
PUT           block = 64-byte block header (it      OK | EXISTS | FULL | TOO_LARGE | CORRUPT |
              carries the key) + data (1)          BAD_REQUEST; no payload
GET           key (1)                              OK + block (header + data) | MISS
MATCH_PREFIX  keys of a prompt's chain (n); with    OK, count = number of leading keys present,
              FLAG_MATCH_HINT then a hint: u8 L,   payload = one tier byte per matched key
              L bytes of UTF-8 (the node id that
              holds the blocks)
EXISTS        keys (n)                             OK, count = n, payload = bitmap, bit i = key i
                                                   present, LSB first, ceil(n / 8) bytes
DELETE        keys (n)                             OK, count = number deleted
STATS         none (0)                             OK + JSON (UTF-8)
SHM_INFO      none (0)                             OK + JSON describing the arena file
GET_SHM       key (1)                              OK + (lease_id, offset, nbytes) as <QQQ | MISS
                                                   | FULL (beyond the pin limits)
RELEASE       lease ids as <Q each (n)             no response
LEASE_BATCH   keys (n)                             OK, count = n, payload = batch id <Q, then n
                                                   (offset, nbytes) as <QQ, then n tier bytes
                                                   (0 miss, 1 DRAM, 2 read from SSD, both
                                                   leased; 255: not leased now, ask again;
                                                   254: node's pin cap reached, GET it)
RELEASE_BATCH batch ids as <Q each (n)             no response
RESERVE_BATCH n (key, block bytes) as <16sQ (n)     OK, count = n, payload = batch id <Q, then n
                                                   offsets <Q, then n status bytes (OK reserved,
                                                   EXISTS, FULL, TOO_LARGE, BAD_REQUEST) | FULL
                                                   (the whole batch refused: use PUT)
COMMIT_BATCH  batch id <Q (1)                      OK, count = n, payload = n status bytes (OK
                                                   committed, CORRUPT: the header the client wrote
                                                   is not a valid header of that key and length;
                                                   or the reservation's status)
RDMA_CONNECT  client's RdmaEndpointInfo (0)        OK + node's RdmaEndpointInfo | UNSUPPORTED +
                                                   reason (UTF-8)
HELLO         client nonce (16) + identity ROLE/    OK + node nonce (16) + node proof (32); OK
              NAME (UTF-8) (0)                     and no payload from a node without a key
HELLO_PROOF   client proof (32) (0)                OK | UNAUTHENTICATED (then closed)
============  ===================================  ================================================

**Credentials** (docs/design/security.md §4): a node given a cluster key answers nothing but
HELLO and HELLO_PROOF until the connection has proved it holds the key; any other request gets
UNAUTHENTICATED and the connection is closed. An op the connection's role may not use gets
FORBIDDEN (the connection stays).

The batch ops (numbered from 16) are the control half of the
one-sided transports (kvstore.transport): the client learns where blocks are in the node's arena
and moves the bytes itself -- a memory copy through the shared mapping, or an RDMA READ/WRITE of
the registered arena -- so one round trip covers a whole batch. Leases and reservations taken by
a batch belong to its connection: a closed connection releases and revokes them.

Malformed frames (bad magic or version, unknown opcode -- including the retired 10, METADATA --, a
count beyond the op's bound (:data:`MAX_KEYS_PER_FRAME`, :data:`MAX_BATCH_ITEMS`), a payload length
other than the one its count implies, or beyond :data:`MAX_FRAME_PAYLOAD`) cannot be
resynchronised, so the server closes that connection, judging by the 24-byte header alone: no
request but a PUT carries more than :data:`MAX_REQUEST_PAYLOAD` (64 KiB), and a PUT's payload is
received into the arena space reserved for it (or drained), so no header makes a node allocate.
A well-framed PUT whose content is wrong (bad block header, checksum mismatch, larger than the
node's ``max_block_bytes``) is drained and answered with an error status instead.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from kvstore.blocks.hashing import BLOCK_KEY_BYTES
from kvstore.wire.messages import (
    BATCH_ID,
    HELLO_MAX_BYTES,
    HELLO_MIN_BYTES,
    HELLO_PROOF_BYTES,
    LEASE_ID,
    MAX_HINT_BYTES,
    RDMA_INFO,
    RESERVE_ITEM,
)

__all__ = [
    "DEFAULT_MAX_BLOCK_BYTES",
    "FLAG_MATCH_HINT",
    "FLAG_NO_FORWARD",
    "FRAME_HEADER",
    "FRAME_HEADER_BYTES",
    "KEY_BYTES",
    "MAX_BATCH_ITEMS",
    "MAX_FRAME_PAYLOAD",
    "MAX_KEYS_PER_FRAME",
    "MAX_REQUEST_PAYLOAD",
    "PROTOCOL_VERSION",
    "FrameError",
    "FrameHeader",
    "Op",
    "Status",
    "pack_frame_header",
]

FRAME_MAGIC = b"SKVP"
PROTOCOL_VERSION = 1
FRAME_HEADER = struct.Struct("<4sBBBBIIQ")
FRAME_HEADER_BYTES = FRAME_HEADER.size
assert FRAME_HEADER_BYTES == 24

FLAG_NO_FORWARD = 0x01
"""Frame flag: a peer's request (GET, MATCH_PREFIX); the receiving node answers from its own
tiers and never forwards it to another peer."""
FLAG_MATCH_HINT = 0x02
"""Frame flag of a MATCH_PREFIX request only: after its keys comes a hint, the cluster node id
that holds the prompt's blocks (:func:`kvstore.wire.messages.encode_match_hint`)."""

KEY_BYTES = BLOCK_KEY_BYTES
MAX_KEYS_PER_FRAME = 4096
"""Keys per MATCH_PREFIX/EXISTS/DELETE frame (64 KiB of keys); clients split longer lists. A
chain of 4096 blocks is a prompt of 65,536 tokens at 16 tokens a block: a lookup is one frame or
two."""
MAX_BATCH_ITEMS = 2048
"""Keys per LEASE_BATCH, blocks per RESERVE_BATCH, ids per RELEASE / RELEASE_BATCH (the client
sends at most 128 keys, 64 blocks, 1 id a frame)."""
DEFAULT_MAX_BLOCK_BYTES = 64 * 1024**2
"""Largest block (header + data) a node accepts and a client reads, unless configured otherwise."""
MAX_FRAME_PAYLOAD = 1 << 30
"""Hard ceiling on any frame's payload: beyond it a frame is treated as garbage, not as data."""


class Op(enum.IntEnum):
    PUT = 1
    GET = 2
    MATCH_PREFIX = 3
    EXISTS = 4
    DELETE = 5
    STATS = 6
    SHM_INFO = 7
    GET_SHM = 8
    RELEASE = 9
    # 10 was METADATA: the node's metadata is a gRPC service now (kvstore.metadata.service).
    HELLO = 11
    HELLO_PROOF = 12
    # Transport ops (kvstore.transport), numbered from 16.
    LEASE_BATCH = 16
    RELEASE_BATCH = 17
    RESERVE_BATCH = 18
    COMMIT_BATCH = 19
    RDMA_CONNECT = 20


class Status(enum.IntEnum):
    """Response status. The first three equal :class:`kvstore.wire.types.PutStatus` values."""

    OK = 0
    EXISTS = 1
    FULL = 2
    MISS = 3
    TOO_LARGE = 4
    CORRUPT = 5
    BAD_REQUEST = 6
    UNAUTHENTICATED = 7
    """The node needs cluster credentials first (HELLO), or refused them; it closes the
    connection after this reply."""
    FORBIDDEN = 8
    """The connection's identity may not use this op (docs/design/security.md §4.2)."""
    UNSUPPORTED = 16
    """The node cannot serve this transport (RDMA_CONNECT without RDMA); payload: the reason."""


KEYED_OPS = frozenset({Op.MATCH_PREFIX, Op.EXISTS, Op.DELETE})
SINGLE_KEY_OPS = frozenset({Op.GET, Op.GET_SHM})
EMPTY_OPS = frozenset({Op.STATS, Op.SHM_INFO})


def _max_request_payload(op: Op) -> int:
    """The largest payload a request of ``op`` (not PUT) can carry; :meth:`check_request` holds
    every request to exactly its count's length, and every count to these bounds."""
    if op in SINGLE_KEY_OPS:
        return KEY_BYTES
    if op is Op.MATCH_PREFIX:
        return MAX_KEYS_PER_FRAME * KEY_BYTES + 1 + MAX_HINT_BYTES
    if op in KEYED_OPS:
        return MAX_KEYS_PER_FRAME * KEY_BYTES
    if op is Op.LEASE_BATCH:
        return MAX_BATCH_ITEMS * KEY_BYTES
    if op is Op.RELEASE or op is Op.RELEASE_BATCH:
        return MAX_BATCH_ITEMS * LEASE_ID.size
    if op is Op.RESERVE_BATCH:
        return MAX_BATCH_ITEMS * RESERVE_ITEM.size
    if op is Op.COMMIT_BATCH:
        return BATCH_ID.size
    if op is Op.RDMA_CONNECT:
        return RDMA_INFO.size
    if op is Op.HELLO:
        return HELLO_MAX_BYTES
    if op is Op.HELLO_PROOF:
        return HELLO_PROOF_BYTES
    return 0


MAX_REQUEST_PAYLOAD = max(_max_request_payload(op) for op in Op if op is not Op.PUT)
"""The largest payload of any request but a PUT (64 KiB: a frame of MAX_KEYS_PER_FRAME keys). A
node receives every such frame whole into one fixed buffer of each connection: a header that
claims more is refused before a byte of its payload is read, so no frame makes a node allocate."""


class FrameError(ValueError):
    """A frame header that cannot be trusted; the connection must be dropped."""


@dataclass(frozen=True, slots=True)
class FrameHeader:
    opcode: Op
    status: int
    request_id: int
    count: int
    payload_len: int
    flags: int = 0

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> FrameHeader:
        """Parse and sanity-check a frame header; raises :class:`FrameError`."""
        magic, version, opcode, status, flags, request_id, count, payload_len = (
            FRAME_HEADER.unpack_from(buf, offset)
        )
        if magic != FRAME_MAGIC:
            raise FrameError(f"bad frame magic {bytes(magic)!r}")
        if version != PROTOCOL_VERSION:
            raise FrameError(f"unsupported protocol version {version}")
        try:
            op = Op(opcode)
        except ValueError:
            raise FrameError(f"unknown opcode {opcode}") from None
        if payload_len > MAX_FRAME_PAYLOAD:
            raise FrameError(f"absurd payload length {payload_len}")
        return cls(op, status, request_id, count, payload_len, flags)

    def check_request(self) -> None:
        """Check that a request's count and payload length agree with its opcode."""
        op, count, length = self.opcode, self.count, self.payload_len
        if self.flags & FLAG_MATCH_HINT:  # the keys, then a hint of 1..MAX_HINT_BYTES
            keys = count * KEY_BYTES
            ok = (
                op is Op.MATCH_PREFIX
                and count <= MAX_KEYS_PER_FRAME
                and keys + 2 <= length <= keys + 1 + MAX_HINT_BYTES
            )
        elif op is Op.PUT:
            ok = count == 1
        elif op in SINGLE_KEY_OPS:
            ok = count == 1 and length == KEY_BYTES
        elif op in KEYED_OPS:
            ok = count <= MAX_KEYS_PER_FRAME and length == count * KEY_BYTES
        elif op is Op.LEASE_BATCH:
            ok = count <= MAX_BATCH_ITEMS and length == count * KEY_BYTES
        elif op is Op.RELEASE or op is Op.RELEASE_BATCH:
            ok = count <= MAX_BATCH_ITEMS and length == count * LEASE_ID.size
        elif op is Op.RESERVE_BATCH:
            ok = 0 < count <= MAX_BATCH_ITEMS and length == count * RESERVE_ITEM.size
        elif op is Op.COMMIT_BATCH:
            ok = count == 1 and length == BATCH_ID.size
        elif op is Op.RDMA_CONNECT:
            ok = count == 0 and length == RDMA_INFO.size
        elif op is Op.HELLO:
            ok = count == 0 and HELLO_MIN_BYTES <= length <= HELLO_MAX_BYTES
        elif op is Op.HELLO_PROOF:
            ok = count == 0 and length == HELLO_PROOF_BYTES
        else:
            ok = count == 0 and length == 0
        if not ok:
            raise FrameError(f"{op.name} request with count={count} payload_len={length}")


def pack_frame_header(
    opcode: Op, request_id: int, count: int, payload_len: int, status: int = 0, flags: int = 0
) -> bytes:
    return FRAME_HEADER.pack(
        FRAME_MAGIC, PROTOCOL_VERSION, opcode, status, flags, request_id, count, payload_len
    )
