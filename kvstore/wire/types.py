"""The typed results of store operations, shared by the node and both clients.

Importing this module loads nothing but the enums: a client returns these without importing the
node's state (:mod:`kvstore.node.store`) or the SSD tier.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvstore.blocks.tier import Tier

__all__ = ["NodeMatch", "PutStatus"]


class PutStatus(enum.IntEnum):
    """Outcome of a put. Values are also the wire status codes (``kvstore.wire.frame.Status``)."""

    OK = 0
    """Stored."""
    EXISTS = 1
    """Already stored or being stored under this key; nothing was changed."""
    FULL = 2
    """No room even after evicting every evictable block; nothing was stored."""


@dataclass(frozen=True, slots=True)
class NodeMatch:
    """How much of a key chain one node holds, and where: ``tiers[i]`` is the fastest tier holding
    key ``i`` of the matched prefix (``depth`` keys)."""

    depth: int
    tiers: tuple[Tier, ...]
