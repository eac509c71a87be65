"""Eviction policies: which committed block to drop when the arena is full.

A policy is a separate object injected into :class:`kvstore.node.StoreNode` so that policies can be
swapped and compared (LRU now; LFU/ARC and Belady's offline optimum on the conversation trace
later) without touching the node. A policy only orders keys. The node alone decides whether a key
*may* go -- it passes a ``can_evict`` predicate that rejects leased blocks -- and only committed
blocks are ever tracked (the node calls :meth:`EvictionPolicy.on_insert` at commit), so a block
being written or read is never chosen.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

__all__ = ["EvictionPolicy", "LRUPolicy"]


class EvictionPolicy(Protocol):
    """What the store node needs from an eviction policy. Keys are block keys (16 bytes)."""

    def on_insert(self, key: bytes) -> None:
        """``key`` was committed and is now a candidate for eviction."""

    def on_access(self, key: bytes) -> None:
        """``key`` was read (or re-put) -- a hint of future use."""

    def on_remove(self, key: bytes) -> None:
        """``key`` left the store (evicted or deleted); forget it."""

    def select_victim(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        """Return the best key to evict among those with ``can_evict(key)``, or None.

        Must not change the policy's state: the node calls :meth:`on_remove` once it has
        actually removed the block.
        """

    def __len__(self) -> int:
        """Number of keys tracked."""


class LRUPolicy:
    """Least recently used first, in O(1) per event.

    An ``OrderedDict`` is a hash map over a doubly linked list, which is what LRU needs: O(1)
    ``move_to_end`` on access and O(1) removal from the middle when a block is deleted. Victim
    selection walks from the cold end and skips keys the node refuses (leased blocks), so its cost
    is 1 + the number of leased blocks colder than the victim.
    """

    __slots__ = ("_order",)

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def on_insert(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def select_victim(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        for key in self._order:
            if can_evict(key):
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)
