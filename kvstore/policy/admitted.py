"""``AdmittedPolicy``: any policy (as *main*) behind an admission filter, with a small LRU window
for new keys whose size adapts as ARC's ``p``. ``PolicyKind.W_TINYLFU`` and
``PolicyKind.SECOND_HIT_LRU`` build it with an LRU main. A refused block is simply the next victim,
so the node's protocol is unchanged (docs/design/kvstore.md §6.2).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from kvstore.policy.admission import AdmissionFilter
from kvstore.policy.base import EvictionPolicy

__all__ = ["AdmittedPolicy"]


class AdmittedPolicy:
    """An eviction policy behind an admission filter, with a window that adapts as ARC's ``p``.

    New keys enter a small LRU *window*; the rest of the cache is the ``main`` policy (W-TinyLFU's
    structure, Einziger et al. 2017, for any main policy and any :class:`AdmissionFilter`). When a
    victim is needed and the window is over its target size, its least recent key -- the
    *candidate* -- is put to the admission filter against main's victim: admitted, the
    candidate moves into main and main's victim is evicted; refused, the candidate is evicted and
    main is untouched. So a block with no history of reuse never pushes a proven one out, yet it
    is still stored on arrival and served from the window while it is recent.

    **Adaptive window** (``adapt_window=True``). How much of the cache should go to unproven keys
    depends on the workload -- on the conversation trace LRU (all window) is best at 20 % of the
    distinct blocks and admission at 1 %. As ARC steers ``p``, two ghost FIFOs of keys evicted
    from the window and from main (each bounded by the tracked keys) steer the window's target:
    a key put again while in the window's ghost means a larger window would have hit, so the
    target grows by ``max(|main ghost| / |window ghost|, 1)``; a key put again while in main's
    ghost shrinks it by the inverse. The target starts at ``window_ratio`` of the cache (default
    0.5: from the middle it reaches either end within a trace; Caffeine's 1 % start adapts too
    slowly at 20 % of the trace, 83 % of Belady against 91 %) and stays in ``[0, tracked + 1]``.
    Without adaptation the target is ``window_ratio`` of the tracked keys.

    Fitting the node's protocol, which stores a block first and asks for victims later:

    * **Admission is decided lazily**, at the eviction that makes room for the candidate's
      successor, not when the candidate is put. A refused key is then the next victim, so the
      node and :class:`~kvstore.node.tiers.TierManager` need no change: a refused block in DRAM is
      simply the next one spilled (it still lands on SSD) or evicted.
    * **Warm-up**: the arena fills before the first eviction, with every key in the window. The
      first selection moves all but one key over the target into main without a comparison (main
      was not full while they arrived), as Caffeine's ``evictFromWindow`` does.
    * :meth:`select_victim` reorganises (moves keys from window into main) but never drops a key,
      and returns the same key until the next event, as the protocol requires.
    """

    __slots__ = (
        "_adapt",
        "_admission",
        "_main",
        "_main_ghost",
        "_target",
        "_victim",
        "_window",
        "_window_ghost",
        "_window_ratio",
    )

    def __init__(
        self,
        main: EvictionPolicy,
        admission: AdmissionFilter,
        window_ratio: float = 0.5,
        *,
        adapt_window: bool = True,
    ) -> None:
        if not 0.0 <= window_ratio <= 1.0:
            raise ValueError("need 0 <= window_ratio <= 1")
        if len(main):
            raise ValueError("the main policy must start empty")
        self._main = main
        self._admission = admission
        self._window_ratio = window_ratio
        self._adapt = adapt_window
        self._target: float | None = None  # adaptive target in keys; set at the first selection
        self._window: OrderedDict[bytes, None] = OrderedDict()  # least recent first
        self._window_ghost: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._main_ghost: OrderedDict[bytes, None] = OrderedDict()
        self._victim: bytes | None = None

    @property
    def main(self) -> EvictionPolicy:
        return self._main

    @property
    def admission(self) -> AdmissionFilter:
        return self._admission

    @property
    def window_target(self) -> float:
        """The number of keys the window is steered towards now."""
        if self._adapt and self._target is not None:
            return self._target
        return self._window_ratio * len(self)

    def on_insert(self, key: bytes) -> None:
        if key in self._window or key in self._main:
            self.on_access(key)
            return
        self._victim = None
        if self._adapt:
            self._adapt_target(key)
        self._admission.record(key)
        self._window[key] = None
        self._admission.ensure_capacity(len(self))

    def on_access(self, key: bytes) -> None:
        if key in self._window:
            self._window.move_to_end(key)
        elif key in self._main:
            self._main.on_access(key)
        else:
            return
        self._victim = None
        self._admission.record(key)

    def on_remove(self, key: bytes) -> None:
        if key in self._window:
            del self._window[key]
            ghost = self._window_ghost
        elif key in self._main:
            self._main.on_remove(key)
            ghost = self._main_ghost
        else:
            return
        self._victim = None
        if self._adapt:
            ghost[key] = None
            while len(ghost) > len(self):
                ghost.popitem(last=False)

    def select_victim(self, can_evict: Callable[[bytes], bool]) -> bytes | None:
        victim = self._victim
        if victim is not None and can_evict(victim):
            return victim
        window, main = self._window, self._main
        if self._adapt and self._target is None:
            self._target = self._window_ratio * len(self)
        target = self.window_target
        while len(window) > target + 1:  # main had room while these arrived
            key, _ = window.popitem(last=False)
            main.on_insert(key)
        victim = None
        if len(window) > target:
            candidate = next((key for key in window if can_evict(key)), None)
            incumbent = main.select_victim(can_evict)
            if candidate is None:
                victim = incumbent
            elif incumbent is None:
                victim = candidate
            elif self._admission.admit(candidate, incumbent):
                del window[candidate]
                main.on_insert(candidate)
                victim = main.select_victim(can_evict)  # main's order may have changed
            else:
                victim = candidate
        if victim is None:
            victim = main.select_victim(can_evict)
        if victim is None:
            victim = next((key for key in window if can_evict(key)), None)
        self._victim = victim
        return victim

    def __len__(self) -> int:
        return len(self._window) + len(self._main)

    def __contains__(self, key: object) -> bool:
        return key in self._window or key in self._main

    def _adapt_target(self, key: bytes) -> None:
        """ARC's adaptation of ``p``, applied to the window: called for a key being put."""
        window_ghost, main_ghost = self._window_ghost, self._main_ghost
        if self._target is None:
            return  # nothing evicted yet
        if key in window_ghost:
            step = max(len(main_ghost) / len(window_ghost), 1.0)
            self._target = min(float(len(self) + 1), self._target + step)
            del window_ghost[key]
        elif key in main_ghost:
            step = max(len(window_ghost) / len(main_ghost), 1.0)
            self._target = max(0.0, self._target - step)
            del main_ghost[key]
