"""LRU: least recently used."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

__all__ = ["LRUPolicy"]


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

    def __contains__(self, key: object) -> bool:
        return key in self._order
