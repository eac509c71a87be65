"""ARC, the Adaptive Replacement Cache (Megiddo & Modha, FAST '03)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

__all__ = ["ARCPolicy"]


class ARCPolicy:
    """ARC: recency list T1, frequency list T2, ghosts B1/B2 adapting T1's target size ``p``.

    * **Insert**: a key that is a ghost in B1 (evicted from T1 recently: recency was too short)
      grows ``p`` by ``max(|B2| / |B1|, 1)`` and enters T2; a ghost in B2 shrinks ``p`` by
      ``max(|B1| / |B2|, 1)`` and enters T2; a new key enters T1. Then the ghosts are trimmed to
      ``|T1| + |B1| <= c`` and ``|T1| + |T2| + |B1| + |B2| <= 2c``, oldest first, where ``c`` is
      the number of tracked keys.
    * **Access**: a key in T1 moves to T2's most recent end; a key in T2 moves to its end.
    * **Select** (ARC's REPLACE): the least recent evictable key of T1 if ``|T1| > p`` (or T2 is
      empty), else of T2; if that list has no evictable key, the other one. Does not mutate.
    * **Remove**: from T1 into B1, from T2 into B2.

    The textbook REPLACE also evicts from T1 when ``|T1| == p`` and the incoming key is in B2; the
    node chooses victims before it commits the new key, so that tie rule is not applied.
    """

    __slots__ = ("_b1", "_b2", "_p", "_t1", "_t2")

    def __init__(self) -> None:
        self._t1: OrderedDict[bytes, None] = OrderedDict()  # least recent first
        self._t2: OrderedDict[bytes, None] = OrderedDict()
        self._b1: OrderedDict[bytes, None] = OrderedDict()
        self._b2: OrderedDict[bytes, None] = OrderedDict()
        self._p = 0.0

    @property
    def target_t1(self) -> float:
        """ARC's ``p``: the size T1 is steered towards."""
        return self._p

    def on_insert(self, key: bytes) -> None:
        if key in self._t1 or key in self._t2:
            self.on_access(key)
            return
        capacity = len(self._t1) + len(self._t2) + 1
        if key in self._b1:
            self._p = min(capacity, self._p + max(len(self._b2) / len(self._b1), 1.0))
            del self._b1[key]
            self._t2[key] = None
        elif key in self._b2:
            self._p = max(0.0, self._p - max(len(self._b1) / len(self._b2), 1.0))
            del self._b2[key]
            self._t2[key] = None
        else:
            self._t1[key] = None
        while len(self._t1) + len(self._b1) > capacity and self._b1:
            self._b1.popitem(last=False)
        while capacity + len(self._b1) + len(self._b2) > 2 * capacity and self._b2:
            self._b2.popitem(last=False)

    def on_access(self, key: bytes) -> None:
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        elif key in self._t2:
            self._t2.move_to_end(key)

    def on_remove(self, key: bytes) -> None:
        if key in self._t1:
            del self._t1[key]
            self._b1[key] = None
        elif key in self._t2:
            del self._t2[key]
            self._b2[key] = None

    def select_victim(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        if self._t1 and (len(self._t1) > self._p or not self._t2):
            order = (self._t1, self._t2)
        else:
            order = (self._t2, self._t1)
        for keys in order:
            for key in keys:
                if can_evict(key):
                    return key
        return None

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2
