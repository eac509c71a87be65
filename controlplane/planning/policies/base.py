"""The sizing interface and what the rules share."""

from __future__ import annotations

from typing import Protocol

from controlplane.planning.types import (
    LatencyModel,
    LoadForecast,
    LoadSample,
    PlannerConfig,
    PoolSizes,
)

__all__ = ["SizingPolicy", "best_decode_batch"]


class SizingPolicy(Protocol):
    def size(
        self,
        forecast: LoadForecast,
        model: LatencyModel,
        last: LoadSample | None,
        config: PlannerConfig,
    ) -> PoolSizes:
        """Pools for ``forecast`` (before the planner's bounds and hysteresis); ``last``: the
        interval just observed (for rules that correct themselves from it)."""
        ...


def best_decode_batch(
    model: LatencyModel,
    step_limit_s: float,
    context_tokens: float,
    sequence_tokens: float,
    max_num_seqs: int,
    kv_capacity_tokens: int,
) -> int:
    """The largest batch ``b`` (>= 1) with ``decode_step_s(b, b·context) <= step_limit_s`` and
    ``b·sequence_tokens <= kv_capacity_tokens``, at most ``max_num_seqs``; 1 when even one
    sequence misses the limit (a pool is sized for the load, admission refuses the rest)."""
    by_kv = int(kv_capacity_tokens // max(1.0, sequence_tokens))
    best = 1
    for b in range(1, min(max_num_seqs, max(1, by_kv)) + 1):
        if model.decode_step_s(b, round(b * context_tokens)) <= step_limit_s:
            best = b
        else:
            break  # the step time grows with the batch
    return best
