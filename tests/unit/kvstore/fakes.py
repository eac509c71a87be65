"""Test doubles shared by the kvstore unit tests."""

from __future__ import annotations


def k(n: int) -> bytes:
    """The 16-byte block key numbered ``n``."""
    return n.to_bytes(16, "big")
