"""Exact tests of the node's limits as rules (kvstore.server.limits): deadlines and pin caps."""

from __future__ import annotations

import pytest

from kvstore.server.limits import (
    RECV_BUFFER_BYTES,
    Activity,
    Deadlines,
    Expiry,
    LimitCounters,
    Pin,
    PinLimits,
)
from kvstore.wire.frame import FRAME_HEADER_BYTES, MAX_REQUEST_PAYLOAD

DEADLINES = Deadlines(header_timeout_s=10, put_timeout_s=20, lease_timeout_s=30, idle_timeout_s=300)


def test_every_request_but_a_put_fits_the_receive_buffer() -> None:
    assert RECV_BUFFER_BYTES == 68 * 1024
    assert RECV_BUFFER_BYTES >= FRAME_HEADER_BYTES + MAX_REQUEST_PAYLOAD


@pytest.mark.parametrize(
    ("activity", "now", "expected"),
    [
        (Activity(last_progress=100.0), 400.0, None),  # exactly the idle timeout: not past it
        (Activity(last_progress=100.0), 400.5, Expiry.IDLE),
        (Activity(last_progress=100.0, frame_since=100.0), 110.0, None),
        (Activity(last_progress=100.0, frame_since=100.0), 110.25, Expiry.HEADER),
        (Activity(last_progress=105.0, payload_since=100.0), 120.0, None),
        (Activity(last_progress=105.0, payload_since=100.0), 120.5, Expiry.PAYLOAD),
        (Activity(last_progress=105.0, lease_since=100.0), 130.0, None),
        (Activity(last_progress=105.0, lease_since=100.0), 131.0, Expiry.LEASE),
        # A stalled transfer is named before the idleness it also is.
        (Activity(last_progress=0.0, payload_since=0.0, lease_since=0.0), 1000.0, Expiry.PAYLOAD),
        (Activity(last_progress=0.0, frame_since=0.0, lease_since=0.0), 1000.0, Expiry.HEADER),
        (Activity(last_progress=0.0, lease_since=0.0), 1000.0, Expiry.LEASE),
        # Traffic does not excuse a frame that never completes, nor a lease never released.
        (Activity(last_progress=119.0, frame_since=100.0), 120.0, Expiry.HEADER),
        (Activity(last_progress=139.0, lease_since=100.0), 140.0, Expiry.LEASE),
    ],
)
def test_deadlines(activity: Activity, now: float, expected: Expiry | None) -> None:
    assert DEADLINES.expired(activity, now) is expected


def test_reaper_period_is_a_quarter_of_the_shortest_deadline_at_most_a_second() -> None:
    assert DEADLINES.reaper_period_s == 1.0
    short = Deadlines(header_timeout_s=0.5, put_timeout_s=20, lease_timeout_s=2, idle_timeout_s=1)
    assert short.reaper_period_s == 0.125
    with pytest.raises(ValueError, match="positive"):
        Deadlines(header_timeout_s=0, put_timeout_s=1, lease_timeout_s=1, idle_timeout_s=1)
    with pytest.raises(ValueError, match="positive"):
        Deadlines(header_timeout_s=1, put_timeout_s=1, lease_timeout_s=1, idle_timeout_s=-1)


def test_reasons_name_the_limit() -> None:
    assert [DEADLINES.reason(e) for e in Expiry] == [
        "a frame not complete within 10s",
        "payload not received within 20s; abandoning it",
        "a lease held for more than 30s; releasing them",
        "idle for more than 300s",
    ]


# A 64-block arena of 1 MiB blocks: the node-wide cap is 32 blocks, a connection's share 16.
LIMITS = PinLimits.of_arena(64 << 20, node_fraction=0.5, connection_fraction=0.25)
MIB = 1 << 20


def test_pin_limits_of_the_arena() -> None:
    assert PinLimits(node_bytes=32 * MIB, connection_bytes=16 * MIB) == LIMITS


@pytest.mark.parametrize(
    ("node", "conn", "nbytes", "at_least_one", "expected"),
    [
        (0, 0, MIB, True, Pin.OK),
        (15 * MIB, 15 * MIB, MIB, True, Pin.OK),  # exactly its share
        (16 * MIB, 16 * MIB, MIB, True, Pin.DEFER),  # one idle client stops at 16 of 64 blocks
        (16 * MIB, 16 * MIB, MIB, False, Pin.DEFER),
        # A connection holding nothing always gets one block, even one above its share...
        (0, 0, 20 * MIB, True, Pin.OK),
        (0, 0, 20 * MIB, False, Pin.DEFER),  # ... but not a reservation (RESERVE_BATCH → FULL)
        # ... within the node-wide cap, which nothing exceeds.
        (31 * MIB, 0, MIB, True, Pin.OK),
        (32 * MIB, 0, MIB, True, Pin.REFUSE),
        (20 * MIB, 0, 20 * MIB, True, Pin.REFUSE),
        (32 * MIB, 16 * MIB, MIB, True, Pin.REFUSE),  # refused before deferred
    ],
)
def test_pin_verdicts(node: int, conn: int, nbytes: int, at_least_one: bool, expected: Pin) -> None:
    assert LIMITS.verdict(node, conn, nbytes, at_least_one=at_least_one) is expected


def test_two_idle_clients_cannot_pin_more_than_the_node_wide_cap() -> None:
    """Clients that lease block after block and never release: each stops at its share, all
    together at the node-wide cap -- half the arena stays evictable for new blocks."""
    node = 0
    held = [0, 0, 0]
    for c in range(3):
        for _ in range(64):
            if LIMITS.verdict(node, held[c], MIB, at_least_one=True) is Pin.OK:
                held[c] += MIB
                node += MIB
    assert held == [16 * MIB, 16 * MIB, 0]
    assert node == LIMITS.node_bytes


def test_counters_count_each_expiry_but_the_lease_one() -> None:
    counters = LimitCounters()
    for expiry in [Expiry.HEADER, Expiry.PAYLOAD, Expiry.PAYLOAD, Expiry.IDLE, Expiry.LEASE]:
        counters.count(expiry)
    assert (counters.header_timeouts, counters.payload_timeouts, counters.idle_closed) == (1, 2, 1)
