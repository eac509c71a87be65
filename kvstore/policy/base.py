"""The eviction policy interface: a policy only orders keys; the node decides whether one may go.

A policy is a separate object injected into :class:`kvstore.node.store.StoreNode` so that policies
can be swapped and compared without touching the node. The node passes a ``can_evict`` predicate
that rejects leased blocks, and only committed blocks are ever tracked (the node calls
:meth:`EvictionPolicy.on_insert` at commit), so a block being written or read is never chosen.

Two adaptations to a store that sizes itself in bytes, shared by every policy of this package:

* **No capacity in entries.** Eviction only happens when the arena is full, so the number of
  tracked blocks is the cache size at that moment, and S3-FIFO's 10 % / 90 % split, its ghost size
  and ARC's ``c`` are taken relative to it (with uniform blocks that is the textbook algorithm).
* **Every removal counts as an eviction** for the ghost lists. The protocol does not say why a key
  left, and evictions and spills to a lower tier are by far the common cause; a DELETE'd key also
  leaves a ghost, which only changes which queue the key enters if it is stored again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ["EvictionPolicy"]


class EvictionPolicy(Protocol):
    """What the store node needs from an eviction policy. Keys are block keys (16 bytes)."""

    def on_insert(self, key: bytes) -> None:
        """``key`` was committed and is now a candidate for eviction."""

    def on_access(self, key: bytes) -> None:
        """``key`` was read (or re-put) -- a hint of future use."""

    def on_remove(self, key: bytes) -> None:
        """``key`` left the store (evicted, spilled or deleted); forget it."""

    def select_victim(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        """Return the best key to evict among those with ``can_evict(key)``, or None.

        Must not change which keys are tracked: the node calls :meth:`on_remove` once it has
        actually removed the block. A policy may reorganise its order while looking (S3-FIFO and
        SIEVE promote and reinsert lazily -- that is the algorithm), but calling it again without
        other events in between returns the same key.
        """

    def __len__(self) -> int:
        """Number of keys tracked."""

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is tracked (a lookup: not an access)."""
