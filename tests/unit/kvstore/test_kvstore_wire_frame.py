"""Exact tests of the wire protocol's frame header and bitmap (kvstore.wire)."""

from __future__ import annotations

import struct

import pytest

from kvstore.wire import requests
from kvstore.wire.frame import (
    FLAG_MATCH_HINT,
    FLAG_NO_FORWARD,
    FRAME_HEADER_BYTES,
    MAX_BATCH_ITEMS,
    MAX_FRAME_PAYLOAD,
    MAX_KEYS_PER_FRAME,
    MAX_REQUEST_PAYLOAD,
    FrameError,
    FrameHeader,
    Op,
    Status,
    pack_frame_header,
)
from kvstore.wire.messages import (
    MAX_HINT_BYTES,
    decode_bitmap,
    decode_match_hint,
    encode_bitmap,
    encode_match_hint,
)


def test_header_layout() -> None:
    raw = pack_frame_header(Op.EXISTS, 0xDEADBEEF, 3, 48, Status.MISS)
    assert len(raw) == FRAME_HEADER_BYTES == 24
    assert raw == b"SKVP" + struct.pack("<BBBBIIQ", 1, 4, 3, 0, 0xDEADBEEF, 3, 48)
    assert FrameHeader.decode(raw) == FrameHeader(Op.EXISTS, Status.MISS, 0xDEADBEEF, 3, 48)
    assert FrameHeader.decode(b"pad" + raw, offset=3).request_id == 0xDEADBEEF


def test_status_values_match_put_status() -> None:
    from kvstore.wire.types import PutStatus

    for status in PutStatus:
        assert int(Status[status.name]) == int(status)


@pytest.mark.parametrize(
    "raw",
    [
        b"XKVP" + struct.pack("<BBBBIIQ", 1, 2, 0, 0, 1, 1, 16),
        b"SKVP" + struct.pack("<BBBBIIQ", 2, 2, 0, 0, 1, 1, 16),
        b"SKVP" + struct.pack("<BBBBIIQ", 1, 0, 0, 0, 1, 1, 16),
        b"SKVP" + struct.pack("<BBBBIIQ", 1, 2, 0, 0, 1, 1, MAX_FRAME_PAYLOAD + 1),
    ],
    ids=["magic", "version", "opcode", "length"],
)
def test_decode_rejects(raw: bytes) -> None:
    with pytest.raises(FrameError):
        FrameHeader.decode(raw)


@pytest.mark.parametrize(
    ("op", "count", "length", "ok"),
    [
        (Op.PUT, 1, 64 + 10, True),
        (Op.PUT, 2, 64 + 10, False),
        (Op.GET, 1, 16, True),
        (Op.GET, 1, 15, False),
        (Op.GET_SHM, 2, 32, False),
        (Op.MATCH_PREFIX, 0, 0, True),
        (Op.MATCH_PREFIX, 3, 48, True),
        (Op.EXISTS, 3, 47, False),
        (Op.DELETE, MAX_KEYS_PER_FRAME, MAX_KEYS_PER_FRAME * 16, True),
        (Op.DELETE, MAX_KEYS_PER_FRAME + 1, (MAX_KEYS_PER_FRAME + 1) * 16, False),
        (Op.RELEASE, 2, 16, True),
        (Op.RELEASE, 2, 32, False),
        (Op.STATS, 0, 0, True),
        (Op.STATS, 0, 1, False),
        (Op.SHM_INFO, 1, 0, False),
        # the transport ops (numbered from 16)
        (Op.LEASE_BATCH, 3, 48, True),
        (Op.LEASE_BATCH, 3, 47, False),
        (Op.LEASE_BATCH, MAX_BATCH_ITEMS, MAX_BATCH_ITEMS * 16, True),
        (Op.LEASE_BATCH, MAX_BATCH_ITEMS + 1, (MAX_BATCH_ITEMS + 1) * 16, False),
        (Op.RELEASE, MAX_BATCH_ITEMS + 1, (MAX_BATCH_ITEMS + 1) * 8, False),
        (Op.RELEASE, 65536, 512 * 1024, False),  # the 512 KiB RELEASE frame
        (Op.RELEASE_BATCH, 2, 16, True),
        (Op.RELEASE_BATCH, 2, 8, False),
        (Op.RELEASE_BATCH, MAX_BATCH_ITEMS + 1, (MAX_BATCH_ITEMS + 1) * 8, False),
        (Op.RESERVE_BATCH, 2, 48, True),
        (Op.RESERVE_BATCH, MAX_BATCH_ITEMS + 1, (MAX_BATCH_ITEMS + 1) * 24, False),
        (Op.RESERVE_BATCH, 0, 0, False),
        (Op.RESERVE_BATCH, 2, 47, False),
        (Op.COMMIT_BATCH, 1, 8, True),
        (Op.COMMIT_BATCH, 2, 16, False),
        (Op.RDMA_CONNECT, 0, 48, True),
        (Op.RDMA_CONNECT, 0, 47, False),
    ],
)
def test_check_request(op: Op, count: int, length: int, ok: bool) -> None:
    header = FrameHeader(op, 0, 1, count, length)
    if ok:
        header.check_request()
    else:
        with pytest.raises(FrameError):
            header.check_request()


def test_bitmap_roundtrip_lsb_first() -> None:
    flags = [True, False, False, False, False, False, False, False, False, True]
    assert encode_bitmap(flags) == b"\x01\x02"
    assert decode_bitmap(b"\x01\x02", 10) == flags
    assert encode_bitmap([]) == b""
    assert decode_bitmap(b"", 0) == []
    with pytest.raises(ValueError):
        decode_bitmap(b"\x01", 9)


def test_the_largest_request_but_a_put_is_64_kib_and_a_hint() -> None:
    assert MAX_REQUEST_PAYLOAD == MAX_KEYS_PER_FRAME * 16 + 1 + MAX_HINT_BYTES == 64 * 1024 + 256
    assert MAX_BATCH_ITEMS * 24 < MAX_REQUEST_PAYLOAD  # RESERVE_BATCH items are 24 bytes


@pytest.mark.parametrize("opcode", [n for n in range(256) if n not in {int(op) for op in Op}])
def test_every_unknown_opcode_is_refused_by_its_header(opcode: int) -> None:
    """Including 10, the retired METADATA: a header claiming a 64 MiB payload of an op that does
    not exist is refused before a byte of the payload is read."""
    raw = b"SKVP" + struct.pack("<BBBBIIQ", 1, opcode, 0, 0, 1, 0, 64 << 20)
    with pytest.raises(FrameError, match=f"unknown opcode {opcode}"):
        FrameHeader.decode(raw)


@pytest.mark.parametrize("op", [op for op in Op if op is not Op.PUT])
@pytest.mark.parametrize("item_bytes", [1, 8, 16, 24, 48])
@pytest.mark.parametrize("claimed", [MAX_REQUEST_PAYLOAD + 8, 64 << 20, MAX_FRAME_PAYLOAD])
def test_no_request_but_a_put_may_claim_more_than_64_kib(
    op: Op, item_bytes: int, claimed: int
) -> None:
    """Whatever count goes with it (one that matches the length included), a header of any op
    but PUT that claims more than MAX_REQUEST_PAYLOAD is malformed."""
    for count in (0, 1, claimed // item_bytes, min(claimed // item_bytes, 0xFFFFFFFF)):
        for flags in (0, FLAG_MATCH_HINT):
            header = FrameHeader(op, 0, 1, min(count, 0xFFFFFFFF), claimed, flags)
            with pytest.raises(FrameError):
                header.check_request()


# -- MATCH_PREFIX's hint (docs/design/kvstore.md §4.1, §10.9) -----------------------------------


def test_a_hinted_match_prefix_frame_is_exact() -> None:
    k0, k1 = bytes(range(16)), bytes(range(1, 17))
    header, payload = requests.match_prefix(9, [k0, k1], hint="node-a")
    assert header == pack_frame_header(Op.MATCH_PREFIX, 9, 2, 32 + 7, flags=FLAG_MATCH_HINT)
    assert payload == k0 + k1 + b"\x06node-a"
    assert FrameHeader.decode(header).flags == FLAG_MATCH_HINT
    # without a hint: the frame is what it always was; a peer's has FLAG_NO_FORWARD
    assert (
        b"".join(requests.match_prefix(9, [k0]))
        == pack_frame_header(Op.MATCH_PREFIX, 9, 1, 16) + k0
    )
    assert requests.keyed(Op.MATCH_PREFIX, 9, [k0], "n") == requests.match_prefix(9, [k0], hint="n")
    peer = requests.match_prefix(9, [k0], from_peer=True)[0]
    assert FrameHeader.decode(peer).flags == FLAG_NO_FORWARD


def test_hint_encoding_roundtrips_utf8_and_is_bounded() -> None:
    for node_id in ("a", "store-ä.example:7600", "x" * MAX_HINT_BYTES):
        raw = encode_match_hint(node_id)
        assert raw[0] == len(node_id.encode()) and decode_match_hint(raw) == node_id
    for bad in ("", "x" * (MAX_HINT_BYTES + 1), "ä" * 128):
        with pytest.raises(ValueError):
            encode_match_hint(bad)
        with pytest.raises(ValueError):
            requests.check_hint(bad)
    requests.check_hint(None)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x00", b"\x01", b"\x02a", b"\x01ab", b"\x01\xff"],
    ids=["empty", "zero length", "missing byte", "short", "long", "not utf-8"],
)
def test_a_hint_that_does_not_frame_itself_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_match_hint(raw)


@pytest.mark.parametrize(
    ("op", "count", "length", "ok"),
    [
        (Op.MATCH_PREFIX, 2, 32 + 2, True),  # the shortest hint: one byte of id
        (Op.MATCH_PREFIX, 2, 32 + 1 + MAX_HINT_BYTES, True),
        (Op.MATCH_PREFIX, 0, 2, True),
        (Op.MATCH_PREFIX, 2, 32, False),  # the flag, and no hint
        (Op.MATCH_PREFIX, 2, 33, False),  # a length byte and no id
        (Op.MATCH_PREFIX, 2, 32 + 2 + MAX_HINT_BYTES, False),
        (Op.MATCH_PREFIX, MAX_KEYS_PER_FRAME + 1, (MAX_KEYS_PER_FRAME + 1) * 16 + 2, False),
        (Op.EXISTS, 2, 34, False),  # the hint is MATCH_PREFIX's only
        (Op.GET, 1, 16, False),
        (Op.LEASE_BATCH, 2, 32, False),
    ],
)
def test_check_request_with_the_hint_flag(op: Op, count: int, length: int, ok: bool) -> None:
    header = FrameHeader(op, 0, 1, count, length, FLAG_MATCH_HINT)
    if ok:
        header.check_request()
    else:
        with pytest.raises(FrameError):
            header.check_request()
