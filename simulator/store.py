"""A store node's tiers as a model: DRAM and SSD capacities in blocks, ordered by the real
eviction policies of :mod:`kvstore.policy` (docs/design/simulator.md §5).

:class:`SimStoreNode` holds keys, not bytes: a put stores the keys it lacks in DRAM, evicting
the DRAM policy's victims down to SSD (when there is one) and the SSD policy's victims out; a
read of an SSD-only block promotes it back to DRAM, as a real node does. Every change is
published as the node's events would be (``publish(tier, stored, removed)``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kvstore.blocks.hashing import BlockKey
from kvstore.blocks.tier import Tier
from kvstore.policy.factory import PolicyKind, make_policy

__all__ = ["SimStoreNode"]

Publish = Callable[[Tier, tuple[BlockKey, ...], tuple[BlockKey, ...]], None]


class SimStoreNode:
    def __init__(
        self,
        node_id: str,
        host: str,
        *,
        dram_blocks: int,
        ssd_blocks: int,
        eviction: PolicyKind,
        publish: Publish | None = None,
    ) -> None:
        if dram_blocks < 1 or ssd_blocks < 0:
            raise ValueError("a store node needs dram_blocks >= 1 and ssd_blocks >= 0")
        self.node_id = node_id
        self.host = host
        self.dram_blocks = dram_blocks
        self.ssd_blocks = ssd_blocks
        self._dram = make_policy(eviction)
        self._ssd = make_policy(eviction)
        self._publish = publish
        self._stored: list[BlockKey] = []
        """DRAM inserts not published yet (:meth:`_insert_dram`)."""
        self.num_puts = 0
        self.num_promotions = 0
        self.num_dropped = 0

    def tier_of(self, key: BlockKey) -> Tier | None:
        if key in self._dram:
            return Tier.DRAM
        if key in self._ssd:
            return Tier.SSD
        return None

    def held(self, keys: Iterable[BlockKey]) -> int:
        """Leading keys this node holds in either tier."""
        depth = 0
        for key in keys:
            if key not in self._dram and key not in self._ssd:
                break
            depth += 1
        return depth

    def put(self, keys: Iterable[BlockKey]) -> int:
        """Store the keys this node lacks (in DRAM); the number stored."""
        stored = 0
        for key in keys:
            if key in self._dram:
                self._dram.on_access(key)
                continue
            if key in self._ssd:
                continue  # a copy exists; the read path promotes it when it is wanted
            self._insert_dram(key)
            stored += 1
        self._flush_stored()
        self.num_puts += stored
        return stored

    def read(self, keys: Iterable[BlockKey]) -> tuple[int, int]:
        """A reader fetches ``keys`` (each held here): (DRAM blocks, SSD-only blocks). SSD-only
        ones are promoted to DRAM."""
        dram = ssd = 0
        for key in keys:
            if key in self._dram:
                self._dram.on_access(key)
                dram += 1
            elif key in self._ssd:
                ssd += 1
                self._ssd.on_remove(key)
                self._emit(Tier.SSD, (), (key,))
                self._insert_dram(key)
                self.num_promotions += 1
        self._flush_stored()
        return dram, ssd

    def _insert_dram(self, key: BlockKey) -> None:
        """``key`` into DRAM, evicting a block if it is full. Stored keys are published in
        batches, but a batch goes out before any removal: an eviction of a key of the same
        batch must reach the index after its store, or the index keeps a block that is gone."""
        if len(self._dram) >= self.dram_blocks:
            victim = self._dram.select_victim(lambda _key: True)
            if victim is not None:
                self._flush_stored()
                self._dram.on_remove(victim)
                self._emit(Tier.DRAM, (), (victim,))
                self._demote(victim)
        self._dram.on_insert(key)
        self._stored.append(key)

    def _flush_stored(self) -> None:
        if self._stored:
            stored, self._stored = tuple(self._stored), []
            self._emit(Tier.DRAM, stored, ())

    def _demote(self, key: BlockKey) -> None:
        if self.ssd_blocks == 0:
            self.num_dropped += 1
            return
        if len(self._ssd) >= self.ssd_blocks:
            victim = self._ssd.select_victim(lambda _key: True)
            if victim is not None:
                self._ssd.on_remove(victim)
                self._emit(Tier.SSD, (), (victim,))
                self.num_dropped += 1
        self._ssd.on_insert(key)
        self._emit(Tier.SSD, (key,), ())

    def _emit(
        self, tier: Tier, stored: tuple[BlockKey, ...], removed: tuple[BlockKey, ...]
    ) -> None:
        if self._publish is not None:
            self._publish(tier, stored, removed)
