"""What the prefix index answers: ``PrefixMatch`` (per holder and tier, how deep a key chain is
held), ``HolderMatch``, ``IndexStats``, and ``ApplyResult`` (what applying an event did).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from kvstore.blocks.tier import NUM_TIERS, Tier

__all__ = ["ApplyResult", "HolderMatch", "IndexStats", "MaskArray", "PrefixMatch"]


MaskArray = npt.NDArray[np.unsignedinteger[Any]]


class ApplyResult(enum.Enum):
    """What :meth:`PrefixIndex.apply` did with an event."""

    APPLIED = "applied"
    """The event was the next one expected from its source (or a ``SourceCleared``)."""
    DUPLICATE = "duplicate"
    """Its sequence number was already seen: ignored."""
    GAP = "gap"
    """Events were lost before it: resync the source (fetch a snapshot, call ``resync``).

    The event itself was applied if the source was known, and ignored if it was not (see
    docs/design/kvstore.md §10.2)."""


@dataclass(frozen=True, slots=True)
class HolderMatch:
    """How much of a chain one holder can serve alone.

    ``depth``: the number of leading blocks the holder holds (in any tier).
    ``num_blocks_by_tier[t]`` (index with :class:`Tier`): how many of those ``depth`` blocks have
    tier ``t`` as the holder's fastest copy; the counts sum to ``depth``.
    """

    holder: str
    depth: int
    num_blocks_by_tier: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class IndexStats:
    """Occupancy of a :class:`PrefixIndex`."""

    num_blocks: int
    num_sources: int
    num_holder_bits: int
    """Holder ids one mask can name before it widens."""
    slot_capacity: int
    table_capacity: int
    num_tombstones: int
    memory_bytes: int


class PrefixMatch:
    """The answer to :meth:`PrefixIndex.match` for one key chain (read-only).

    * ``depth``: the number of leading keys held by some holder in some tier.
    * ``depth_by_tier[t]``: the number of leading keys each held by some holder in tier ``t`` *or a
      faster one*; so ``depth_by_tier[HBM] <= depth_by_tier[DRAM] <= depth_by_tier[SSD] == depth``.
    * ``holders``: a :class:`HolderMatch` per holder holding at least the first block, by depth
      (descending) then holder id.
    * ``holders_at(i)``: every ``(holder, tier)`` pair that holds block ``i < depth``.

    It owns a copy of the matched blocks' holder masks (taken at match time), so later index
    updates do not change it; the per-holder figures are computed on first use.
    """

    __slots__ = ("_depth", "_depth_by_tier", "_holders", "_names", "_rows", "_word_bits")

    def __init__(
        self,
        depth: int,
        depth_by_tier: tuple[int, ...],
        rows: MaskArray | None,
        names: tuple[str | None, ...],
        word_bits: int,
    ) -> None:
        self._depth = depth
        self._depth_by_tier = depth_by_tier
        self._rows = rows
        self._names = names
        self._word_bits = word_bits
        self._holders: tuple[HolderMatch, ...] | None = None

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def depth_by_tier(self) -> tuple[int, ...]:
        return self._depth_by_tier

    @property
    def holders(self) -> tuple[HolderMatch, ...]:
        if self._holders is None:
            self._holders = self._compute_holders()
        return self._holders

    def holder(self, holder: str) -> HolderMatch | None:
        """The :class:`HolderMatch` of ``holder``, or None if it does not hold the first block."""
        for match in self.holders:
            if match.holder == holder:
                return match
        return None

    def holders_at(self, i: int) -> tuple[tuple[str, Tier], ...]:
        """Every ``(holder, tier)`` holding block ``i < depth``, by tier then holder id."""
        if not 0 <= i < self._depth or self._rows is None:
            raise IndexError(f"block {i} is outside the matched prefix of {self._depth}")
        bits = unpack_bits(self._rows[i])  # (tiers, holder ids)
        pairs: list[tuple[str, Tier]] = []
        for tier in Tier:
            names = sorted(self._name(int(h)) for h in np.flatnonzero(bits[tier]))
            pairs.extend((name, tier) for name in names)
        return tuple(pairs)

    def __repr__(self) -> str:
        return f"PrefixMatch(depth={self._depth}, depth_by_tier={self._depth_by_tier})"

    def _name(self, holder_id: int) -> str:
        name = self._names[holder_id]
        assert name is not None, "a holder id with bits set is always named"
        return name

    def _compute_holders(self) -> tuple[HolderMatch, ...]:
        rows = self._rows
        if rows is None:
            return ()
        # prefix[i] = holders that hold every block 0..i (in some tier).
        prefix = np.bitwise_and.accumulate(np.bitwise_or.reduce(rows, axis=1), axis=0)
        # reach[i, t] = holders of block i in tier t or faster, among those of prefix[i].
        reach = np.bitwise_or.accumulate(rows, axis=1)
        reach &= prefix[:, None, :]
        counts = unpack_bits(reach).sum(axis=0, dtype=np.int64)  # (tiers, holder ids)
        ids = np.flatnonzero(counts[-1])
        matches = []
        for holder_id, cumulative in zip(ids.tolist(), counts[:, ids].T.tolist(), strict=True):
            by_tier = tuple(b - a for a, b in zip([0, *cumulative], cumulative, strict=False))
            matches.append(HolderMatch(self._name(holder_id), cumulative[-1], by_tier))
        matches.sort(key=lambda m: (-m.depth, m.holder))
        return tuple(matches)


NO_MATCH: Final = PrefixMatch(0, (0,) * NUM_TIERS, None, (), 8)


def unpack_bits(words: MaskArray) -> npt.NDArray[np.uint8]:
    """Bits of little-endian mask words along the last axis: ``[..., w] -> [..., holder id]``."""
    little = np.ascontiguousarray(words, dtype=words.dtype.newbyteorder("<"))
    return np.unpackbits(little.view(np.uint8), axis=-1, bitorder="little")
