"""Stored block format: a fixed 64-byte header followed by the payload.

A block is stored, sent and (later) spilled as one contiguous byte string, ``header || payload``, so
that every tier and transport moves it with a single copy and any reader can check it on its own.
The header is fixed-size so that a receiver can read exactly 64 bytes, learn the payload length and
then receive the payload straight into its final buffer.

Block format, version 2 (all integers little-endian)::

    offset size field
     0      4   magic             b"SKVB"
     4      2   format version    2
     6      1   dtype code        BlockDType (0 = opaque bytes)
     7      1   ndim              0..6
     8     16   key               the block's key (kvstore.blocks.hashing)
    24      8   payload length    bytes that follow the header
    32      8   checksum          xxh3_64 of the payload, seeded with the header seed
    40     24   shape             6 x uint32; dims past ndim are 0

The header seed is the xxh3_64 (seed 0) of the header's other 56 bytes (0-31 and 40-63), so the
checksum covers the header too: a bit flipped in the key, dtype, shape or length fields fails it
just like one in the payload. (Version 1 checksummed the payload only: a flipped key bit in a PUT
stored the block under another key, a flipped dtype bit went unnoticed -- found by the chaos
suite, tests/chaos/test_kv_corruption.py.) A version-1 block fails to decode: a miss.

The key is inside the header so that a block read back from any tier proves which block it is (a
misrouted or stale buffer is caught, not used). The checksum is verified on every read that crossed
a boundary where bytes can go wrong -- network and SSD -- but not on in-process arena reads.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from kvstore.blocks.hashing import BLOCK_KEY_BYTES

__all__ = [
    "BLOCK_FORMAT_VERSION",
    "BLOCK_HEADER_BYTES",
    "BLOCK_MAGIC",
    "MAX_NDIM",
    "BlockDType",
    "BlockFormatError",
    "BlockHeader",
    "checksum",
    "encode_header",
    "header_seed",
    "verify",
]

BLOCK_MAGIC = b"SKVB"
BLOCK_FORMAT_VERSION = 2
MAX_NDIM = 6

_STRUCT = struct.Struct(f"<4sHBB{BLOCK_KEY_BYTES}sQQ{MAX_NDIM}I")
BLOCK_HEADER_BYTES = _STRUCT.size
assert BLOCK_HEADER_BYTES == 64

_MAX_DIM = 2**32 - 1


class BlockFormatError(ValueError):
    """A buffer is not a valid block header (bad magic, unknown version or dtype, bad shape)."""


class BlockDType(enum.IntEnum):
    """Element type of a block's payload; codes are part of the stored format, never renumber."""

    RAW = 0
    UINT8 = 1
    INT8 = 2
    FLOAT16 = 3
    BFLOAT16 = 4
    FLOAT32 = 5
    FLOAT8_E4M3FN = 6
    FLOAT8_E5M2 = 7
    INT32 = 8

    @property
    def itemsize(self) -> int:
        """Bytes per element (1 for RAW, whose shape counts bytes)."""
        return _ITEMSIZE[self]

    @classmethod
    def from_name(cls, name: str) -> BlockDType:
        """Map a torch/numpy dtype name (``"bfloat16"``, ``"torch.float16"``) to its code."""
        key = name.removeprefix("torch.").upper()
        try:
            return cls[key]
        except KeyError:
            raise ValueError(f"unsupported block dtype {name!r}") from None


_ITEMSIZE = {
    BlockDType.RAW: 1,
    BlockDType.UINT8: 1,
    BlockDType.INT8: 1,
    BlockDType.FLOAT16: 2,
    BlockDType.BFLOAT16: 2,
    BlockDType.FLOAT32: 4,
    BlockDType.FLOAT8_E4M3FN: 1,
    BlockDType.FLOAT8_E5M2: 1,
    BlockDType.INT32: 4,
}


_CHECKSUM_AT = 32  # offset of the checksum field, 8 bytes


def header_seed(raw: bytes | bytearray | memoryview) -> int:
    """The seed of a block's payload checksum: xxh3_64 of its header's 64 bytes less the
    checksum field (the first 64 bytes of ``raw``)."""
    view = memoryview(raw)
    return xxhash.xxh3_64_intdigest(
        bytes(view[:_CHECKSUM_AT]) + bytes(view[_CHECKSUM_AT + 8 : BLOCK_HEADER_BYTES])
    )


def checksum(payload: bytes | bytearray | memoryview, seed: int) -> int:
    """Return the checksum stored in a header for ``payload`` (``seed``: :func:`header_seed`)."""
    return xxhash.xxh3_64_intdigest(payload, seed)


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """A decoded block header. Construct with :meth:`decode`, write with :func:`encode_header`."""

    key: bytes
    dtype: BlockDType
    shape: tuple[int, ...]
    payload_nbytes: int
    checksum: int
    seed: int
    """:func:`header_seed` of the header this was decoded from."""

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> BlockHeader:
        """Parse the first 64 bytes of ``buf``; raises :class:`BlockFormatError` if invalid."""
        if len(buf) < BLOCK_HEADER_BYTES:
            raise BlockFormatError(f"block header needs {BLOCK_HEADER_BYTES} bytes, got {len(buf)}")
        magic, version, dtype_code, ndim, key, nbytes, digest, *dims = _STRUCT.unpack_from(buf)
        if magic != BLOCK_MAGIC:
            raise BlockFormatError(f"bad block magic {magic!r}")
        if version != BLOCK_FORMAT_VERSION:
            raise BlockFormatError(f"unsupported block format version {version}")
        try:
            dtype = BlockDType(dtype_code)
        except ValueError:
            raise BlockFormatError(f"unknown block dtype code {dtype_code}") from None
        if ndim > MAX_NDIM or any(dims[ndim:]):
            raise BlockFormatError(f"bad block shape: ndim={ndim} dims={dims}")
        shape = tuple(dims[:ndim])
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise BlockFormatError(f"shape {shape} of {dtype.name} does not match {nbytes} bytes")
        return cls(key, dtype, shape, nbytes, digest, header_seed(buf))


def encode_header(
    key: bytes,
    payload: bytes | bytearray | memoryview,
    dtype: BlockDType = BlockDType.RAW,
    shape: Sequence[int] | None = None,
) -> bytes:
    """Return the 64-byte header for ``payload`` (checksum computed here).

    ``shape`` defaults to ``(payload_nbytes // itemsize,)``; it must describe exactly the payload.
    """
    if len(key) != BLOCK_KEY_BYTES:
        raise ValueError(f"key must be {BLOCK_KEY_BYTES} bytes")
    nbytes = memoryview(payload).nbytes
    if shape is None:
        if nbytes % dtype.itemsize:
            raise ValueError(f"{nbytes} bytes is not a whole number of {dtype.name} elements")
        shape = (nbytes // dtype.itemsize,)
    dims = tuple(shape)
    if len(dims) > MAX_NDIM or any(not 0 <= d <= _MAX_DIM for d in dims):
        raise ValueError(f"shape {dims} not storable (at most {MAX_NDIM} dims of uint32)")
    if math.prod(dims) * dtype.itemsize != nbytes:
        raise ValueError(f"shape {dims} of {dtype.name} does not match {nbytes} payload bytes")
    padded = dims + (0,) * (MAX_NDIM - len(dims))
    fields = (BLOCK_MAGIC, BLOCK_FORMAT_VERSION, dtype, len(dims), bytes(key), nbytes)
    unsealed = _STRUCT.pack(*fields, 0, *padded)
    return _STRUCT.pack(*fields, checksum(payload, header_seed(unsealed)), *padded)


def verify(header: BlockHeader, payload: bytes | bytearray | memoryview) -> bool:
    """Return True if ``payload`` has the header's length and checksum (which also covers the
    header's own fields)."""
    view = memoryview(payload)
    return view.nbytes == header.payload_nbytes and checksum(view, header.seed) == header.checksum
