"""``FrequencySketch``: a count-min sketch of access frequencies, halved periodically (TinyLFU)."""

from __future__ import annotations

from typing import Final

import xxhash

__all__ = ["FrequencySketch"]


_HALVE = bytes(value >> 1 for value in range(256))
"""``bytes.translate`` table that halves every counter of a sketch row in one C-level pass."""


class FrequencySketch:
    """TinyLFU's approximate access counts: a count-min sketch with a doorkeeper, aged by halving.

    * **Counters**: ``depth`` rows of ``width`` 4-bit saturating counters (one byte each here --
      packing two per byte would halve 4 bytes per cache entry at the price of shifts in Python).
      A key's estimate is the minimum of its counters over the rows (count-min: never below the
      truth, above it only on collisions in every row).
    * **Doorkeeper**: a Bloom filter in front of the counters (Einziger et al., TinyLFU, 2017).
      The first access of a key in a period only sets its doorkeeper bits; only later accesses
      reach the counters, so the one-hit wonders that dominate KV traffic (76 % of the
      conversation trace's blocks) do not fill the counters. :meth:`frequency` adds 1 for a key
      in the doorkeeper.
    * **Aging**: after ``sample_factor * width`` recorded accesses every counter is halved (4 → 2,
      1 → 0) and the doorkeeper is cleared -- the *reset* of TinyLFU, so that what was popular an
      hour ago does not lock out what is popular now. The count of recorded accesses is halved
      with the counters.
    * **Hashing**: one xxh3-128 of the key; row ``i`` uses ``(low + i * high) mod width`` and the
      doorkeeper's probes the same double hashing further on (Kirsch & Mitzenmacher). Keys are
      hashes already, but tests use short names, so they are mixed anyway.

    ``width`` is rounded up to a power of two and grows with :meth:`ensure_capacity` (resetting the
    counts, as Caffeine does), since the store does not know its capacity in blocks.
    """

    MAX_COUNT: Final = 15
    DOORKEEPER_PROBES: Final = 3

    __slots__ = (
        "_additions",
        "_depth",
        "_doorkeeper",
        "_doorkeeper_bits",
        "_mask",
        "_rows",
        "_sample_factor",
        "_sample_size",
        "_width",
    )

    def __init__(
        self,
        width: int = 64,
        *,
        depth: int = 4,
        sample_factor: int = 10,
        doorkeeper_bits_per_counter: int = 8,
    ) -> None:
        if width < 1 or depth < 1 or sample_factor < 1 or doorkeeper_bits_per_counter < 0:
            raise ValueError("need width, depth, sample_factor >= 1 and doorkeeper bits >= 0")
        self._depth = depth
        self._sample_factor = sample_factor
        self._doorkeeper_bits = doorkeeper_bits_per_counter
        self._width = 0
        self._mask = 0
        self._rows: list[bytearray] = []
        self._sample_size = 0
        self._doorkeeper: bytearray | None = None
        self._additions = 0
        self._allocate(width)

    @property
    def width(self) -> int:
        """Counters per row (a power of two)."""
        return self._width

    @property
    def sample_size(self) -> int:
        """Recorded accesses between two halvings."""
        return self._sample_size

    @property
    def num_recorded(self) -> int:
        """Accesses recorded since the last halving (itself halved by it)."""
        return self._additions

    def increment(self, key: bytes) -> None:
        """Record one access: the doorkeeper takes a key's first, the counters the rest."""
        low, high = self._hashes(key)
        # A key's first access in this period only sets its doorkeeper bits.
        if self._doorkeeper is None or self._admit_to_doorkeeper(low, high):
            mask, max_count = self._mask, self.MAX_COUNT
            for i, row in enumerate(self._rows):
                index = (low + i * high) & mask
                if row[index] < max_count:
                    row[index] += 1
        self._additions += 1
        if self._additions >= self._sample_size:
            self.halve()

    def frequency(self, key: bytes) -> int:
        """Estimated accesses in the current period (at most ``MAX_COUNT`` + 1)."""
        low, high = self._hashes(key)
        mask = self._mask
        count = min(row[(low + i * high) & mask] for i, row in enumerate(self._rows))
        return count + self._in_doorkeeper(low, high)

    def halve(self) -> None:
        """Age the history: halve every counter and the access count, clear the doorkeeper."""
        for row in self._rows:
            row[:] = row.translate(_HALVE)
        if self._doorkeeper is not None:
            self._doorkeeper = bytearray(len(self._doorkeeper))
        self._additions //= 2

    def ensure_capacity(self, num_entries: int) -> None:
        """Grow (and reset) to at least ``num_entries`` counters per row; never shrinks."""
        if num_entries > self._width:
            self._allocate(num_entries)

    def _allocate(self, width: int) -> None:
        self._width = 1 << max(0, width - 1).bit_length()
        self._mask = self._width - 1
        self._rows = [bytearray(self._width) for _ in range(self._depth)]
        self._sample_size = self._sample_factor * self._width
        bits = self._doorkeeper_bits * self._width
        self._doorkeeper = bytearray((bits + 7) // 8) if bits else None
        self._additions = 0

    @staticmethod
    def _hashes(key: bytes) -> tuple[int, int]:
        digest = xxhash.xxh3_128_intdigest(key)
        return digest & 0xFFFF_FFFF_FFFF_FFFF, (digest >> 64) | 1

    def _doorkeeper_bit(self, low: int, high: int, probe: int) -> tuple[int, int]:
        assert self._doorkeeper is not None
        bit = (low + (self._depth + probe) * high) % (8 * len(self._doorkeeper))
        return bit >> 3, 1 << (bit & 7)

    def _in_doorkeeper(self, low: int, high: int) -> int:
        if self._doorkeeper is None:
            return 0
        for probe in range(self.DOORKEEPER_PROBES):
            byte, bit = self._doorkeeper_bit(low, high, probe)
            if not self._doorkeeper[byte] & bit:
                return 0
        return 1

    def _admit_to_doorkeeper(self, low: int, high: int) -> bool:
        """Set the key's doorkeeper bits; True if they were all set already (seen before)."""
        assert self._doorkeeper is not None
        seen = True
        for probe in range(self.DOORKEEPER_PROBES):
            byte, bit = self._doorkeeper_bit(low, high, probe)
            if not self._doorkeeper[byte] & bit:
                seen = False
                self._doorkeeper[byte] |= bit
        return seen
