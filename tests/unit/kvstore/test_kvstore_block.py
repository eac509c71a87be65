"""Exact tests of the stored block format (kvstore.blocks.format)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash

from kvstore.blocks.format import (
    BLOCK_HEADER_BYTES,
    BlockDType,
    BlockFormatError,
    BlockHeader,
    encode_header,
    verify,
)

KEY = bytes(range(16))


def test_header_layout_is_64_bytes_and_documented() -> None:
    payload = np.arange(24, dtype=np.float16).tobytes()
    raw = encode_header(KEY, payload, BlockDType.FLOAT16, (2, 3, 4))
    assert len(raw) == BLOCK_HEADER_BYTES == 64
    assert raw[:4] == b"SKVB"
    assert struct.unpack_from("<HBB", raw, 4) == (2, int(BlockDType.FLOAT16), 3)
    assert raw[8:24] == KEY
    # The checksum is the payload's xxh3_64 seeded with the xxh3_64 of the other 56 header bytes.
    seed = xxhash.xxh3_64_intdigest(raw[:32] + raw[40:])
    assert struct.unpack_from("<QQ", raw, 24) == (48, xxhash.xxh3_64_intdigest(payload, seed))
    assert struct.unpack_from("<6I", raw, 40) == (2, 3, 4, 0, 0, 0)


def test_roundtrip_and_verify() -> None:
    payload = bytes(range(256)) * 4
    raw = encode_header(KEY, payload)
    header = BlockHeader.decode(raw)
    seed = xxhash.xxh3_64_intdigest(raw[:32] + raw[40:])
    assert header == BlockHeader(
        KEY, BlockDType.RAW, (1024,), 1024, xxhash.xxh3_64_intdigest(payload, seed), seed
    )
    assert verify(header, payload)
    assert verify(header, memoryview(bytearray(payload)))
    corrupted = bytearray(payload)
    corrupted[500] ^= 1
    assert not verify(header, corrupted)
    assert not verify(header, payload[:-1])


@pytest.mark.parametrize("at", [6, 8, 23, 24, 33, 40, 44, 63])
def test_a_flipped_header_bit_fails_the_checksum_or_the_decode(at: int) -> None:
    # Version 1 checksummed the payload only: a flipped key bit went unnoticed (chaos suite).
    payload = bytes(range(256)) * 4
    raw = bytearray(encode_header(KEY, payload, BlockDType.FLOAT8_E4M3FN))
    raw[at] ^= 0x01
    try:
        header = BlockHeader.decode(raw)
    except BlockFormatError:
        return
    assert not verify(header, payload)


def test_a_version_1_block_no_longer_decodes() -> None:
    raw = bytearray(encode_header(KEY, b"x" * 8))
    raw[4] = 1
    with pytest.raises(BlockFormatError, match="version 1"):
        BlockHeader.decode(raw)


def test_decode_accepts_longer_buffer() -> None:
    payload = b"x" * 8
    block = encode_header(KEY, payload) + payload
    assert BlockHeader.decode(memoryview(block)).payload_nbytes == 8


def test_empty_payload() -> None:
    header = BlockHeader.decode(encode_header(KEY, b""))
    assert header.shape == (0,) and header.payload_nbytes == 0
    assert verify(header, b"")


@pytest.mark.parametrize(
    ("offset", "value"),
    [(0, b"XKVB"), (4, struct.pack("<H", 3)), (6, b"\x63"), (7, b"\x07"), (52, b"\x01")],
)
def test_decode_rejects_bad_headers(offset: int, value: bytes) -> None:
    raw = bytearray(encode_header(KEY, b"\x00" * 16, BlockDType.UINT8, (4, 4)))
    raw[offset : offset + len(value)] = value
    with pytest.raises(BlockFormatError):
        BlockHeader.decode(raw)


def test_decode_rejects_shape_length_mismatch_and_short_buffer() -> None:
    raw = bytearray(encode_header(KEY, b"\x00" * 16, BlockDType.UINT8, (4, 4)))
    raw[24:32] = struct.pack("<Q", 17)
    with pytest.raises(BlockFormatError):
        BlockHeader.decode(raw)
    with pytest.raises(BlockFormatError):
        BlockHeader.decode(raw[:63])


def test_encode_rejects_inconsistent_arguments() -> None:
    with pytest.raises(ValueError):
        encode_header(b"short", b"")
    with pytest.raises(ValueError):
        encode_header(KEY, b"\x00" * 3, BlockDType.FLOAT16)
    with pytest.raises(ValueError):
        encode_header(KEY, b"\x00" * 8, BlockDType.FLOAT16, (3,))
    with pytest.raises(ValueError):
        encode_header(KEY, b"", BlockDType.RAW, (0,) * 7)


def test_dtype_from_name() -> None:
    assert BlockDType.from_name("torch.bfloat16") is BlockDType.BFLOAT16
    assert BlockDType.from_name("float8_e4m3fn") is BlockDType.FLOAT8_E4M3FN
    assert BlockDType.BFLOAT16.itemsize == 2
    with pytest.raises(ValueError):
        BlockDType.from_name("complex64")
