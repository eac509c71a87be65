"""S3-FIFO (Yang et al., SOSP '23): a small FIFO that filters one-hit wonders, a main FIFO with
CLOCK-like 2-bit frequencies, and a ghost FIFO.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Final

__all__ = ["S3FIFOPolicy"]


class S3FIFOPolicy:
    """S3-FIFO: small FIFO (10 %), main FIFO (2-bit frequency, reinsertion), ghost FIFO.

    * **Insert**: into the small queue -- or straight into main if the key is a ghost (it was
      evicted from small recently and came back, so it is not a one-hit wonder).
    * **Access**: frequency + 1, capped at 3 (two bits). Nothing moves: a hit costs no reordering.
    * **Select** (the published eviction loop, done lazily here): if the small queue holds at
      least ``small_ratio`` of the tracked keys, look at its oldest key: accessed at least
      ``move_to_main_threshold`` times → it moves to main with its frequency cleared, try the next;
      otherwise it is the victim (and becomes a ghost when removed). Else look at main's oldest
      key: frequency > 0 → reinsert it at the new end with frequency - 1 (CLOCK), try the next;
      otherwise it is the victim. If one queue has no evictable key the other is tried.
    * **Ghost**: keys evicted from small, oldest dropped beyond ``ghost_ratio`` × tracked keys.
    * **Refused keys** (leased) are passed over by moving them to the new end of their queue, so
      a long-leased block is not rescanned on every selection.

    Defaults are the paper's: 10 % small, ghost 90 % of the cache, promotion after 1 access
    (libCacheSim's newer ``S3FIFO.c`` uses 2; the SOSP '23 version, ``S3FIFOv0``, uses 1).
    """

    MAX_FREQ: Final = 3

    __slots__ = (
        "_freq",
        "_ghost",
        "_ghost_ratio",
        "_main",
        "_small",
        "_small_ratio",
        "_threshold",
        "_victim",
    )

    def __init__(
        self,
        small_ratio: float = 0.1,
        ghost_ratio: float = 0.9,
        move_to_main_threshold: int = 1,
    ) -> None:
        if not 0.0 < small_ratio < 1.0 or ghost_ratio < 0.0 or move_to_main_threshold < 1:
            raise ValueError("need 0 < small_ratio < 1, ghost_ratio >= 0, threshold >= 1")
        self._small_ratio = small_ratio
        self._ghost_ratio = ghost_ratio
        self._threshold = move_to_main_threshold
        self._small: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._main: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._ghost: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._freq: dict[bytes, int] = {}  # every tracked key
        self._victim: bytes | None = None  # the last selection, while nothing else happened

    def on_insert(self, key: bytes) -> None:
        if key in self._freq:
            self.on_access(key)
            return
        self._victim = None
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
        self._freq[key] = 0

    def on_access(self, key: bytes) -> None:
        freq = self._freq.get(key)
        if freq is not None:
            self._victim = None
            self._freq[key] = min(freq + 1, self.MAX_FREQ)

    def on_remove(self, key: bytes) -> None:
        if self._freq.pop(key, None) is None:
            return
        self._victim = None
        if key in self._small:
            del self._small[key]
            self._ghost[key] = None
            limit = int(self._ghost_ratio * len(self._freq))
            while len(self._ghost) > limit:
                self._ghost.popitem(last=False)
        else:
            del self._main[key]

    def select_victim(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        victim = self._victim
        if victim is not None and can_evict(victim):
            return victim
        if len(self._small) >= self._small_ratio * len(self._freq):
            victim = self._select_small(can_evict)
            if victim is None:
                victim = self._select_main(can_evict)
        else:
            victim = self._select_main(can_evict)
            if victim is None:
                victim = self._select_small(can_evict)
        self._victim = victim
        return victim

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq

    def _select_small(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        small, freq = self._small, self._freq
        for _ in range(len(small)):
            key = next(iter(small))
            if freq[key] >= self._threshold:
                del small[key]
                self._main[key] = None
                freq[key] = 0
            elif can_evict(key):
                return key
            else:
                small.move_to_end(key)
        return None

    def _select_main(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        main, freq = self._main, self._freq
        # Each pass lowers every frequency by one, so after MAX_FREQ + 1 passes only refused
        # keys can be left.
        for _ in range(len(main) * (self.MAX_FREQ + 1)):
            key = next(iter(main))
            if freq[key] > 0:
                freq[key] -= 1
            elif can_evict(key):
                return key
            main.move_to_end(key)
        return None
