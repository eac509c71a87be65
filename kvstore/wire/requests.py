"""Request frames of every op, as lists of buffers to send with one gathered write.

No I/O and no copies of block data: a PUT's frame is ``[frame header, block header, data]``, the
caller's buffer itself. The request id is the caller's (it matches the reply to the request).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvstore.blocks.format import BLOCK_HEADER_BYTES
from kvstore.wire.frame import (
    FLAG_MATCH_HINT,
    FLAG_NO_FORWARD,
    KEY_BYTES,
    MAX_KEYS_PER_FRAME,
    Op,
    pack_frame_header,
)
from kvstore.wire.messages import (
    BATCH_ID,
    LEASE_ID,
    RESERVE_ITEM,
    RdmaEndpointInfo,
    encode_match_hint,
)

__all__ = [
    "as_bytes_view",
    "check_hint",
    "check_key",
    "commit_batch",
    "empty",
    "get",
    "key_chunks",
    "keyed",
    "match_prefix",
    "put",
    "rdma_connect",
    "release",
    "release_batch",
    "reserve_batch",
]

Buffer = bytes | bytearray | memoryview


def put(request_id: int, block_header: bytes, data: memoryview) -> list[Buffer]:
    """A PUT of one block: its 64-byte header and its payload (the caller's buffer)."""
    length = BLOCK_HEADER_BYTES + data.nbytes
    return [pack_frame_header(Op.PUT, request_id, 1, length), block_header, data]


def put_raw(request_id: int, block: Buffer) -> list[Buffer]:
    """A PUT of a block already laid out as header + payload (a peer's copy)."""
    return [pack_frame_header(Op.PUT, request_id, 1, memoryview(block).nbytes), block]


def get(request_id: int, key: bytes, *, from_peer: bool = False) -> bytes:
    """A GET; ``from_peer``: a node asking another, which must not forward it again."""
    flags = FLAG_NO_FORWARD if from_peer else 0
    return pack_frame_header(Op.GET, request_id, 1, KEY_BYTES, flags=flags) + key


def keyed(op: Op, request_id: int, keys: Sequence[bytes], hint: str | None = None) -> list[Buffer]:
    """MATCH_PREFIX (with its ``hint``), EXISTS, DELETE or LEASE_BATCH of ``keys`` (at most
    MAX_KEYS_PER_FRAME)."""
    if op is Op.MATCH_PREFIX:
        return match_prefix(request_id, keys, hint=hint)
    payload = b"".join(keys)  # one buffer: a gathered send takes at most IOV_MAX (1024)
    return [pack_frame_header(op, request_id, len(keys), len(payload)), payload]


def match_prefix(
    request_id: int, keys: Sequence[bytes], *, hint: str | None = None, from_peer: bool = False
) -> list[Buffer]:
    """A MATCH_PREFIX of ``keys`` (at most MAX_KEYS_PER_FRAME); ``hint``: the cluster node id
    that holds them (``FLAG_MATCH_HINT``, the hint after the keys); ``from_peer``: a node asking
    another, which answers from its own tiers only."""
    payload = b"".join(keys)  # one buffer: a gathered send takes at most IOV_MAX (1024)
    flags = FLAG_NO_FORWARD if from_peer else 0
    if hint is not None:
        payload += encode_match_hint(hint)
        flags |= FLAG_MATCH_HINT
    header = pack_frame_header(Op.MATCH_PREFIX, request_id, len(keys), len(payload), flags=flags)
    return [header, payload]


def empty(op: Op, request_id: int) -> bytes:
    """STATS or SHM_INFO."""
    return pack_frame_header(op, request_id, 0, 0)


def release(lease_id: int) -> bytes:
    """RELEASE of a GET_SHM lease (no reply, so no request id)."""
    return pack_frame_header(Op.RELEASE, 0, 1, LEASE_ID.size) + LEASE_ID.pack(lease_id)


def release_batch(batch_id: int) -> bytes:
    """RELEASE_BATCH of a LEASE_BATCH's leases (no reply, so no request id)."""
    return pack_frame_header(Op.RELEASE_BATCH, 0, 1, BATCH_ID.size) + BATCH_ID.pack(batch_id)


def reserve_batch(request_id: int, blocks: Sequence[tuple[bytes, int]]) -> bytes:
    """RESERVE_BATCH of ``(key, block bytes)`` pairs (block bytes: 64-byte header + payload)."""
    items = b"".join(RESERVE_ITEM.pack(key, nbytes) for key, nbytes in blocks)
    return pack_frame_header(Op.RESERVE_BATCH, request_id, len(blocks), len(items)) + items


def commit_batch(request_id: int, batch_id: int) -> bytes:
    return pack_frame_header(Op.COMMIT_BATCH, request_id, 1, BATCH_ID.size) + BATCH_ID.pack(
        batch_id
    )


def rdma_connect(request_id: int, info: RdmaEndpointInfo) -> bytes:
    payload = info.encode()
    return pack_frame_header(Op.RDMA_CONNECT, request_id, 0, len(payload)) + payload


def check_hint(hint: str | None) -> None:
    """ValueError for a hint no frame can carry (None: no hint)."""
    if hint is not None:
        encode_match_hint(hint)


def check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"block keys are {KEY_BYTES} bytes, got {len(key)}")


def key_chunks(keys: Sequence[bytes]) -> list[Sequence[bytes]]:
    """Check ``keys`` and split them into lists of at most MAX_KEYS_PER_FRAME (one frame each)."""
    for key in keys:
        check_key(key)
    return [keys[i : i + MAX_KEYS_PER_FRAME] for i in range(0, len(keys), MAX_KEYS_PER_FRAME)]


def as_bytes_view(data: Buffer) -> memoryview:
    """A block buffer as a flat byte view (no copy); ValueError if it is not contiguous."""
    view = memoryview(data)
    if not view.contiguous:
        raise ValueError("block buffers must be contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view
