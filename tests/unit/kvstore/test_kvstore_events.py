"""Exact tests of KV events and their wire format (kvstore.cluster.events)."""

from __future__ import annotations

import struct

import pytest

from kvstore.blocks.tier import Tier
from kvstore.cluster.events import (
    BlocksRemoved,
    BlocksStored,
    KVEvent,
    SourceCleared,
    SourceSnapshot,
    decode_event,
    decode_snapshot,
    encode_event,
    encode_snapshot,
)


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_tiers_are_ordered_fastest_first() -> None:
    assert list(Tier) == [Tier.HBM, Tier.DRAM, Tier.SSD]
    assert [int(t) for t in Tier] == [0, 1, 2]
    assert Tier.HBM < Tier.DRAM < Tier.SSD


@pytest.mark.parametrize(
    "event",
    [
        BlocksStored("node-a", 0, Tier.DRAM, (key(1), key(2)), parent=key(0)),
        BlocksStored("node-a", 7, Tier.HBM, (key(1),)),
        BlocksStored("engine-3", 2**64 - 1, Tier.SSD, ()),
        BlocksRemoved("node-b", 5, Tier.SSD, (key(9), key(8), key(7))),
        BlocksRemoved("ünïcode", 1, Tier.DRAM, ()),
        SourceCleared("node-a", 0),
        SourceCleared("n", 123456789),
    ],
)
def test_events_round_trip(event: KVEvent) -> None:
    assert decode_event(encode_event(event)) == event
    assert decode_event(memoryview(bytearray(encode_event(event)))) == event


def test_wire_format_is_pinned() -> None:
    event = BlocksStored("ab", 258, Tier.SSD, (key(1),), parent=key(0))
    expected = (
        bytes([1, 1, 2, 1, 2])  # version, kind STORED, tier SSD, flags PARENT, len("ab")
        + struct.pack("<I", 1)  # one key
        + struct.pack("<Q", 258)
        + b"ab"
        + key(0)
        + key(1)
    )
    assert encode_event(event) == expected
    assert (
        encode_event(SourceCleared("ab", 3))
        == bytes([1, 3, 0, 0, 2, 0, 0, 0, 0]) + bytes([3, 0, 0, 0, 0, 0, 0, 0]) + b"ab"
    )


def test_sixty_four_key_event_size() -> None:
    event = BlocksStored("node-0000001", 1, Tier.DRAM, tuple(key(i) for i in range(64)), key(99))
    assert len(encode_event(event)) == 17 + 12 + 16 + 64 * 16 == 1069


def test_snapshot_round_trip_orders_tiers_fastest_first() -> None:
    snapshot = SourceSnapshot.of(
        "node-a", 41, {Tier.SSD: [key(3)], Tier.HBM: iter([key(1), key(2)]), Tier.DRAM: []}
    )
    assert list(snapshot.keys_by_tier) == [Tier.HBM, Tier.DRAM, Tier.SSD]
    assert snapshot.keys_by_tier[Tier.HBM] == (key(1), key(2))
    data = encode_snapshot(snapshot)
    assert decode_snapshot(data) == snapshot
    with pytest.raises(ValueError, match="snapshot is not an event"):
        decode_event(data)
    with pytest.raises(ValueError, match="not a snapshot"):
        decode_snapshot(encode_event(SourceCleared("node-a", 1)))


def test_snapshot_mapping_is_read_only() -> None:
    snapshot = SourceSnapshot("a", 0, {Tier.DRAM: (key(1),)})
    with pytest.raises(TypeError):
        snapshot.keys_by_tier[Tier.SSD] = ()  # type: ignore[index]


def test_int_tiers_are_coerced_and_bad_ones_refused() -> None:
    assert BlocksStored("a", 0, 1, ()).tier is Tier.DRAM  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BlocksStored("a", 0, 7, ())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        BlocksRemoved("a", 0, "DRAM", ())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: BlocksStored("a", 0, Tier.DRAM, (b"short",)), ValueError),
        (lambda: BlocksStored("a", 0, Tier.DRAM, (bytearray(16),)), ValueError),  # type: ignore[arg-type]
        (lambda: BlocksStored("a", 0, Tier.DRAM, (), parent=b"x" * 17), ValueError),
        (lambda: BlocksStored("", 0, Tier.DRAM, ()), ValueError),
        (lambda: BlocksStored("x" * 256, 0, Tier.DRAM, ()), ValueError),
        (lambda: BlocksRemoved("a", -1, Tier.DRAM, ()), ValueError),
        (lambda: SourceCleared("a", 2**64), ValueError),
        (lambda: SourceCleared("a", True), ValueError),
        (lambda: SourceCleared(b"a", 0), TypeError),  # type: ignore[arg-type]
        (lambda: SourceSnapshot("a", 0, {Tier.SSD: (b"k",)}), ValueError),
    ],
)
def test_invalid_events_fail_where_they_are_made(build: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        build()  # type: ignore[operator]


def test_keys_lists_become_tuples() -> None:
    event = BlocksRemoved("a", 0, Tier.DRAM, [key(1)])  # type: ignore[arg-type]
    assert event.keys == (key(1),)


GOOD = encode_event(BlocksStored("ab", 1, Tier.DRAM, (key(1), key(2)), parent=key(0)))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (GOOD[:10], "too short"),
        (bytes([2]) + GOOD[1:], "version"),
        (GOOD[:1] + bytes([9]) + GOOD[2:], "kind"),
        (GOOD[:2] + bytes([3]) + GOOD[3:], "tier"),
        (GOOD[:3] + bytes([3]) + GOOD[4:], "flags"),
        (GOOD[:4] + bytes([0]) + GOOD[5:], "source id length"),
        (GOOD[:4] + bytes([200]) + GOOD[5:], "source id length"),
        (GOOD[:17] + b"\xff\xfe" + GOOD[19:], "UTF-8"),
        (GOOD[:-1], "expected 2 keys"),
        (GOOD + b"\0", "expected 2 keys"),
        (encode_event(SourceCleared("ab", 1)) + b"\0", "no tier and no keys"),
        (
            encode_event(BlocksRemoved("ab", 1, Tier.DRAM, ()))[:3]
            + bytes([1])
            + encode_event(BlocksRemoved("ab", 1, Tier.DRAM, ()))[4:],
            "flags",
        ),
        (GOOD[:19], "truncated parent"),
    ],
)
def test_malformed_events_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_event(data)


def test_malformed_snapshots_are_refused() -> None:
    good = encode_snapshot(SourceSnapshot("a", 1, {Tier.DRAM: (key(1),)}))
    for data, message in [
        (good[:-1], "truncated keys"),
        (good + b"\0", "trailing"),
        (good[:18], "truncated section"),
        (good[:18] + bytes([5]) + good[19:], "tier"),
    ]:
        with pytest.raises(ValueError, match=message):
            decode_snapshot(data)
    two_sections_same_tier = good[:5] + struct.pack("<I", 2) + good[9:] + struct.pack("<BI", 1, 0)
    with pytest.raises(ValueError, match="repeated tier"):
        decode_snapshot(two_sections_same_tier)
