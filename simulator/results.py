"""From request records to the figures: SLO attainment, goodput, percentiles, ``rate_at_90``
(docs/design/simulator.md §6)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from simulator.loop import TOO_LONG, RequestRecord

__all__ = ["ATTAINMENT_TARGET", "Point", "percentile", "rate_at", "summarize"]

ATTAINMENT_TARGET = 0.9


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (numpy's linear interpolation) of the finite values; None if
    there are none. The one the simulator and the trace replay both report."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.percentile(finite, q)) if finite else None


@dataclass(frozen=True, slots=True)
class Point:
    """One setup at one arrival rate."""

    rate: float
    num_requests: int
    attainment: float
    """Share of the requests (but those too long for the engine, which every system refuses)
    that finished within both SLOs."""
    goodput_rps: float
    """Requests within both SLOs per second of the arrival span."""
    rejected: int
    reject_reasons: dict[str, int]
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    tpot_p99_s: float | None
    cached_token_share: float
    """Prompt tokens not computed by the engine that prefilled them (hits and loads)."""
    routes: dict[str, int]
    makespan_s: float
    gpu_seconds: float = 0.0
    """GPU time the pools held (an instance from asked for to stopped; fixed pools: all along)."""
    gpu_s_per_1k_met: float | None = None
    """GPU-seconds per 1,000 requests served within both SLOs."""

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def summarize(
    records: Sequence[RequestRecord],
    rate: float,
    ttft_slo_s: float,
    tpot_slo_s: float,
    gpu_seconds: float = 0.0,
) -> Point:
    if not records:
        raise ValueError("no records")
    met = sum(r.met(ttft_slo_s, tpot_slo_s) for r in records)
    servable = sum(r.rejected != TOO_LONG for r in records)
    served = [r for r in records if r.finished]
    span = max(r.arrival_s for r in records) - min(r.arrival_s for r in records)
    ends = [r.last_token_s for r in served if r.last_token_s is not None]
    prompt = sum(r.input_tokens for r in served)
    return Point(
        rate=rate,
        num_requests=len(records),
        attainment=met / servable if servable else 0.0,
        goodput_rps=met / span if span > 0 else float(met),
        rejected=sum(r.rejected is not None for r in records),
        reject_reasons=dict(Counter(r.rejected for r in records if r.rejected is not None)),
        ttft_p50_s=percentile([r.ttft_s for r in served], 50),
        ttft_p90_s=percentile([r.ttft_s for r in served], 90),
        ttft_p99_s=percentile([r.ttft_s for r in served], 99),
        tpot_p50_s=percentile([r.tpot_s for r in served if r.num_tokens > 1], 50),
        tpot_p90_s=percentile([r.tpot_s for r in served if r.num_tokens > 1], 90),
        tpot_p99_s=percentile([r.tpot_s for r in served if r.num_tokens > 1], 99),
        cached_token_share=sum(r.cached_tokens for r in served) / prompt if prompt else 0.0,
        routes=dict(Counter(r.route for r in served)),
        makespan_s=(max(ends) - min(r.arrival_s for r in records)) if ends else 0.0,
        gpu_seconds=gpu_seconds,
        gpu_s_per_1k_met=1000 * gpu_seconds / met if met and gpu_seconds else None,
    )


def rate_at(points: Sequence[Point], target: float = ATTAINMENT_TARGET) -> float:
    """Where attainment first falls below ``target`` as the rate grows: interpolated linearly
    between the last swept rate that meets it and the next; the highest swept rate if all meet
    it; 0 if even the lowest misses it."""
    ordered = sorted(points, key=lambda p: p.rate)
    best = 0.0
    for i, point in enumerate(ordered):
        if point.attainment < target:
            if i == 0:
                return 0.0
            below = ordered[i - 1]
            span = below.attainment - point.attainment
            share = (below.attainment - target) / span if span > 0 else 0.0
            return below.rate + share * (point.rate - below.rate)
        best = point.rate
    return best
