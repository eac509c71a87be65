"""What the SSD tier returns and raises: reads, stats, audit reports, errors; its per-block meta."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["AuditReport", "ReadStatus", "SSDRead", "SSDStats", "SSDTierError"]


class SSDTierError(Exception):
    """The SSD tier cannot be opened (directory in use by another node, unusable path)."""


class ReadStatus(enum.Enum):
    OK = "ok"
    """The block was copied into the destination and verified."""
    MISS = "miss"
    """Not stored (or a disk error: the store is a cache, the caller recomputes)."""
    CORRUPT = "corrupt"
    """Stored but failed verification; it has been dropped from the index and queued for
    deletion (:meth:`SSDTier.purge_pending`)."""


@dataclass(frozen=True, slots=True)
class SSDRead:
    """Outcome of :meth:`SSDTier.read_into`: ``nbytes`` of the destination were filled if OK."""

    status: ReadStatus
    nbytes: int = 0


@dataclass(frozen=True, slots=True)
class SSDStats:
    """Occupancy and counters of the SSD tier (``asdict`` goes into the STATS JSON)."""

    path: str
    sync: str
    ttl_s: float
    capacity_bytes: int
    budget_bytes: int
    num_blocks: int
    stored_bytes: int
    used_bytes: int
    writes: int
    write_bytes: int
    write_failures: int
    reads: int
    read_bytes: int
    evictions: int
    expired: int
    corrupt_dropped: int
    deletes: int
    map_full_retries: int
    recovered_blocks: int
    audit_repaired: int


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What :meth:`SSDTier.audit` found (and, with ``repair``, fixed)."""

    blocks: int
    orphan_meta: int
    orphan_blocks: int
    bad_meta: int
    expired: int
    corrupt: int


@dataclass(slots=True)
class Meta:
    nbytes: int
    seq: int
    stored_at_s: float
    expires_at_s: float
