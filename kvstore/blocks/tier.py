"""``Tier``: where a copy of a block lives (HBM < DRAM < SSD); the listener type of tier changes."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Final

from kvstore.blocks.hashing import BlockKey

__all__ = ["NUM_TIERS", "Tier", "TierListener"]


class Tier(enum.IntEnum):
    """Where a copy of a block lives, fastest first: compare and iterate by value, never by name."""

    HBM = 0
    """Resident in an engine's GPU memory (known from the engine's own events)."""
    DRAM = 1
    """In a store node's DRAM arena."""
    SSD = 2
    """In a store node's SSD tier."""


NUM_TIERS: Final = len(Tier)

TierListener = Callable[[BlockKey, Tier, bool], None]
"""``listener(key, tier, held)``: a store tier reports that ``key`` was added to (``held``) or
removed from ``tier``, at the moment of the change. Called on whatever thread made the change
(the event loop for DRAM; SSD writer and reader threads too), possibly under the tier's lock: it
must be quick and must not call back into the tier."""
