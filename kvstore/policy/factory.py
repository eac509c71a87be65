"""``PolicyKind`` and ``make_policy``: the node's ``--eviction-policy`` choices.

Design: docs/design/kvstore.md §6; compared against Belady's optimum by
benchmarks/bench_trace_eviction.py.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from kvstore.policy.admission import GhostAdmission, TinyLFUAdmission
from kvstore.policy.admitted import AdmittedPolicy
from kvstore.policy.arc import ARCPolicy
from kvstore.policy.base import EvictionPolicy
from kvstore.policy.lru import LRUPolicy
from kvstore.policy.s3fifo import S3FIFOPolicy
from kvstore.policy.sieve import SIEVEPolicy

__all__ = ["PolicyKind", "make_policy"]


class PolicyKind(enum.Enum):
    """The eviction policies :func:`make_policy` builds. Values are the configuration names."""

    LRU = "lru"
    S3_FIFO = "s3fifo"
    ARC = "arc"
    SIEVE = "sieve"
    W_TINYLFU = "w-tinylfu"
    """LRU main behind TinyLFU admission (frequency sketch + doorkeeper), adaptive window."""
    SECOND_HIT_LRU = "second-hit-lru"
    """LRU main behind second-hit admission (a ghost of 4x the cache's keys), adaptive window."""


def make_policy(kind: PolicyKind) -> EvictionPolicy:
    """A fresh policy of ``kind`` with its published (or, for admission, measured) defaults."""
    factories: dict[PolicyKind, Callable[[], EvictionPolicy]] = {
        PolicyKind.LRU: LRUPolicy,
        PolicyKind.S3_FIFO: S3FIFOPolicy,
        PolicyKind.ARC: ARCPolicy,
        PolicyKind.SIEVE: SIEVEPolicy,
        PolicyKind.W_TINYLFU: lambda: AdmittedPolicy(LRUPolicy(), TinyLFUAdmission()),
        PolicyKind.SECOND_HIT_LRU: lambda: AdmittedPolicy(LRUPolicy(), GhostAdmission()),
    }
    if not isinstance(kind, PolicyKind):
        raise TypeError(f"expected a PolicyKind, got {kind!r}")
    return factories[kind]()
