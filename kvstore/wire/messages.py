"""Payloads of the kvstore wire protocol's ops (the layouts in :mod:`kvstore.wire.frame`'s table).

Pure encoding and decoding, no I/O and no frame headers: :mod:`kvstore.wire.requests` frames the
requests, :mod:`kvstore.wire.replies` interprets the replies.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kvstore.blocks.hashing import BLOCK_KEY_BYTES

__all__ = [
    "BATCH_ID",
    "HELLO_MAX_BYTES",
    "HELLO_MIN_BYTES",
    "HELLO_NONCE_BYTES",
    "HELLO_PROOF_BYTES",
    "HELLO_REPLY_BYTES",
    "LEASE_DEFERRED",
    "LEASE_ID",
    "LEASE_REFUSED",
    "LEASE_SPAN",
    "MAX_HINT_BYTES",
    "MAX_IDENTITY_BYTES",
    "RDMA_INFO",
    "RESERVE_ITEM",
    "RESERVE_OFFSET",
    "SHM_LEASE",
    "LeaseBatchReply",
    "RdmaEndpointInfo",
    "ReserveBatchReply",
    "decode_bitmap",
    "decode_match_hint",
    "encode_bitmap",
    "encode_match_hint",
]

SHM_LEASE = struct.Struct("<QQQ")
"""GET_SHM response payload: lease id, offset of the block in the arena file, block length."""
LEASE_ID = struct.Struct("<Q")
BATCH_ID = struct.Struct("<Q")
"""Batch ids (LEASE_BATCH, RESERVE_BATCH) on the wire."""
LEASE_SPAN = struct.Struct("<QQ")
"""One LEASE_BATCH entry: offset of the block (header + payload) in the arena, its length."""
LEASE_DEFERRED = 0xFF
"""LEASE_BATCH tier byte: not leased in this batch -- on SSD and not read (each batch reads at
most a few SSD blocks, so that one batch cannot fill the arena with leased blocks), or beyond the
connection's share of pinned arena space; ask again once earlier batches are released."""
LEASE_REFUSED = 0xFE
"""LEASE_BATCH tier byte: not leased because the node's cap on pinned arena space is reached
(other connections hold it); read the block over TCP (a GET pins it only while it is sent)."""
MAX_HINT_BYTES = 255
"""Longest node id a MATCH_PREFIX hint names (UTF-8 bytes; node ids are 1..255 bytes)."""


def encode_match_hint(node_id: str) -> bytes:
    """A MATCH_PREFIX hint (after the keys, with ``FLAG_MATCH_HINT``): u8 length ``L``, then
    ``L`` bytes of UTF-8, the cluster node id that holds the blocks (docs/design/kvstore.md
    §10.9). ValueError for an empty or too long id."""
    raw = node_id.encode()
    if not 0 < len(raw) <= MAX_HINT_BYTES:
        raise ValueError(f"a hint names a node id of 1..{MAX_HINT_BYTES} bytes, got {len(raw)}")
    return bytes([len(raw)]) + raw


def decode_match_hint(buf: bytes | bytearray | memoryview) -> str:
    """The node id of a MATCH_PREFIX hint; ValueError unless ``buf`` is exactly one hint."""
    raw = bytes(buf)
    if len(raw) < 2 or raw[0] != len(raw) - 1:
        raise ValueError(f"a MATCH_PREFIX hint of {len(raw)} bytes does not frame itself")
    return raw[1:].decode()


RESERVE_ITEM = struct.Struct(f"<{BLOCK_KEY_BYTES}sQ")
"""One RESERVE_BATCH request entry: the key and the block's size (64-byte header + payload). The
header itself is written by the client into the reserved space, after the payload's checksum is
known, and checked by the node at COMMIT_BATCH."""
RESERVE_OFFSET = struct.Struct("<Q")
"""One RESERVE_BATCH entry: where the client writes the block (header + payload)."""
RDMA_INFO = struct.Struct("<BBHII16sQQI")
"""RDMA_CONNECT payload: version, path MTU (IBV_MTU_* enum), LID, QP number, PSN, GID, address
and length of the registered region, its rkey (48 bytes)."""
RDMA_INFO_VERSION = 1
HELLO_NONCE_BYTES = 16
HELLO_PROOF_BYTES = 32
MAX_IDENTITY_BYTES = 160
HELLO_MIN_BYTES = HELLO_NONCE_BYTES + 3  # the shortest identity: "r/n"
HELLO_MAX_BYTES = HELLO_NONCE_BYTES + MAX_IDENTITY_BYTES
HELLO_REPLY_BYTES = HELLO_NONCE_BYTES + HELLO_PROOF_BYTES
"""HELLO: the client's nonce then its identity; the reply: the node's nonce then its proof."""


def encode_bitmap(flags: list[bool]) -> bytes:
    """Pack booleans LSB-first into ``ceil(len / 8)`` bytes."""
    out = bytearray((len(flags) + 7) // 8)
    for i, flag in enumerate(flags):
        if flag:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def decode_bitmap(data: bytes | bytearray | memoryview, count: int) -> list[bool]:
    """Inverse of :func:`encode_bitmap`."""
    if len(data) != (count + 7) // 8:
        raise ValueError(f"bitmap of {len(data)} bytes cannot hold exactly {count} flags")
    return [bool(data[i >> 3] & (1 << (i & 7))) for i in range(count)]


@dataclass(frozen=True, slots=True)
class LeaseBatchReply:
    """A LEASE_BATCH response: per key ``tiers[i]``: 0 miss; 1 (DRAM) or 2 (read from SSD):
    leased under ``batch_id`` at ``spans[i] = (offset, nbytes)``; :data:`LEASE_DEFERRED` (ask
    again); :data:`LEASE_REFUSED` (read it over TCP)."""

    batch_id: int
    spans: tuple[tuple[int, int], ...]
    tiers: bytes

    def encode(self) -> bytes:
        if len(self.spans) != len(self.tiers):
            raise ValueError("spans and tiers differ in length")
        spans = (LEASE_SPAN.pack(offset, nbytes) for offset, nbytes in self.spans)
        return _encode_batch(self.batch_id, spans, self.tiers)

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview, count: int) -> LeaseBatchReply:
        """Parse a response body for ``count`` keys; ValueError if its length is not exact."""
        batch_id, spans, tiers = _decode_batch(payload, count, LEASE_SPAN, "LEASE_BATCH", "keys")
        return cls(batch_id, tuple(spans), tiers)


@dataclass(frozen=True, slots=True)
class ReserveBatchReply:
    """A RESERVE_BATCH response: block ``i`` may be written at ``offsets[i]`` if
    ``statuses[i] == Status.OK``; otherwise its status is final for this attempt."""

    batch_id: int
    offsets: tuple[int, ...]
    statuses: bytes

    def encode(self) -> bytes:
        if len(self.offsets) != len(self.statuses):
            raise ValueError("offsets and statuses differ in length")
        offsets = (RESERVE_OFFSET.pack(offset) for offset in self.offsets)
        return _encode_batch(self.batch_id, offsets, self.statuses)

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview, count: int) -> ReserveBatchReply:
        batch_id, entries, statuses = _decode_batch(
            payload, count, RESERVE_OFFSET, "RESERVE_BATCH", "blocks"
        )
        return cls(batch_id, tuple(o for (o,) in entries), statuses)


def _encode_batch(batch_id: int, entries: Iterable[bytes], codes: bytes) -> bytes:
    """A batch reply: the batch id, one packed entry per block, then one code byte per block."""
    return b"".join([BATCH_ID.pack(batch_id), *entries, codes])


def _decode_batch(
    payload: bytes | bytearray | memoryview, count: int, entry: struct.Struct, op: str, unit: str
) -> tuple[int, list[tuple[Any, ...]], bytes]:
    """Inverse of :func:`_encode_batch` for ``count`` entries; ValueError if the length is not
    exact."""
    if len(payload) != BATCH_ID.size + count * (entry.size + 1):
        raise ValueError(f"{op} reply of {len(payload)} bytes for {count} {unit}")
    (batch_id,) = BATCH_ID.unpack_from(payload, 0)
    end = BATCH_ID.size + count * entry.size
    return batch_id, list(entry.iter_unpack(payload[BATCH_ID.size : end])), bytes(payload[end:])


@dataclass(frozen=True, slots=True)
class RdmaEndpointInfo:
    """What one side of an RDMA reliable connection tells the other (RDMA_CONNECT).

    ``qp_num``/``psn``/``lid``/``gid``/``mtu`` connect the two queue pairs (INIT -> RTR -> RTS);
    ``address``/``length``/``rkey`` name the registered region the peer may access one-sidedly:
    the node's arena in the reply, the client's staging buffer in the request.
    """

    qp_num: int
    psn: int
    lid: int
    gid: bytes
    mtu: int
    address: int
    length: int
    rkey: int

    def __post_init__(self) -> None:
        if len(self.gid) != 16:
            raise ValueError(f"an RDMA GID is 16 bytes, got {len(self.gid)}")
        if not 0 <= self.psn < 1 << 24:
            raise ValueError(f"PSN must fit in 24 bits, got {self.psn}")
        if not 0 <= self.qp_num < 1 << 24:
            raise ValueError(f"QP number must fit in 24 bits, got {self.qp_num}")
        if not 1 <= self.mtu <= 5:
            raise ValueError(f"path MTU is an IBV_MTU_* value 1..5, got {self.mtu}")
        for name in ("lid", "address", "length", "rkey"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    def encode(self) -> bytes:
        return RDMA_INFO.pack(
            RDMA_INFO_VERSION,
            self.mtu,
            self.lid,
            self.qp_num,
            self.psn,
            self.gid,
            self.address,
            self.length,
            self.rkey,
        )

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview) -> RdmaEndpointInfo:
        """Parse RDMA_CONNECT bytes; ValueError on a wrong length, version or field."""
        if len(payload) != RDMA_INFO.size:
            raise ValueError(f"RDMA endpoint info is {RDMA_INFO.size} bytes, got {len(payload)}")
        version, mtu, lid, qp_num, psn, gid, address, length, rkey = RDMA_INFO.unpack(payload)
        if version != RDMA_INFO_VERSION:
            raise ValueError(f"unsupported RDMA endpoint info version {version}")
        return cls(qp_num, psn, lid, bytes(gid), mtu, address, length, rkey)
