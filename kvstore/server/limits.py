"""Per-connection limits of a store node, and the key-list helper the handlers share."""

from __future__ import annotations

from kvstore.wire.frame import KEY_BYTES

__all__ = [
    "MAX_FETCHES_PER_CONNECTION",
    "MAX_QUEUED_REPLIES",
    "MAX_SHM_LEASES_PER_CONNECTION",
    "RECV_BUFFER_BYTES",
    "split_keys",
]

RECV_BUFFER_BYTES = 256 * 1024
MAX_SHM_LEASES_PER_CONNECTION = 4096
MAX_FETCHES_PER_CONNECTION = 8
"""SSD reads one connection may have in flight (the disk wants queue depth)."""
MAX_QUEUED_REPLIES = 64
"""Responses one connection may hold back behind pending SSD reads before it stops reading."""


def split_keys(payload: memoryview) -> list[bytes]:
    raw = bytes(payload)
    return [raw[i : i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]
