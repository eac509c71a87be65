"""What the planner reads and returns (docs/design/planner.md §1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "LatencyModel",
    "LoadForecast",
    "LoadSample",
    "PlannerConfig",
    "PoolSizes",
    "PoolView",
    "SplitLatencyModel",
]


class LatencyModel(Protocol):
    """What sizing needs of an instance's latency model (``LatencyPredictor`` is one)."""

    @property
    def ttft_overhead_s(self) -> float:
        """What a request's TTFT adds beyond the engine's time (gateway, hand-off)."""
        ...

    def prefill_s(self, new_tokens: int, cached_tokens: int) -> float: ...

    def decode_step_s(self, batch_size: int, context_tokens: int) -> float: ...


class SplitLatencyModel:
    """Prefill times (and the TTFT overhead) from a prefill instance's model, decode steps from
    a decode instance's: what the planner sizes with."""

    def __init__(self, prefill: LatencyModel, decode: LatencyModel) -> None:
        self._prefill, self._decode = prefill, decode

    @property
    def ttft_overhead_s(self) -> float:
        return self._prefill.ttft_overhead_s

    def prefill_s(self, new_tokens: int, cached_tokens: int) -> float:
        return self._prefill.prefill_s(new_tokens, cached_tokens)

    def decode_step_s(self, batch_size: int, context_tokens: int) -> float:
        return self._decode.decode_step_s(batch_size, context_tokens)


@dataclass(frozen=True, slots=True)
class PoolSizes:
    """Instances in each pool."""

    prefill: int
    decode: int

    def __post_init__(self) -> None:
        if self.prefill < 0 or self.decode < 0:
            raise ValueError(f"pool sizes must be >= 0, got {self.prefill}, {self.decode}")

    @property
    def total(self) -> int:
        return self.prefill + self.decode


@dataclass(frozen=True, slots=True)
class LoadSample:
    """One interval's load, as the gateway saw it: the requests that arrived in it (their
    prompts, as the decision matched them against the caches), those that finished in it (their
    outputs: a request's length is known when it ends), and, for the Dynamo baseline's
    correction factors, latencies observed in it."""

    duration_s: float
    requests: int
    """Requests that arrived (admitted or refused)."""
    prompt_tokens: int
    """Sum of their prompts' lengths."""
    computed_tokens: int
    """Sum of their prompt tokens that had to be computed (not cached in HBM or the pool)."""
    output_tokens: int
    """Sum of the output tokens of the requests that finished."""
    finished: int = 0
    """Requests that finished."""
    ttft_s: float | None = None
    """Mean TTFT of the requests whose first token came in the interval."""
    itl_s: float | None = None
    """Mean time between output tokens of the requests that finished in the interval."""
    decode_batch: float | None = None
    """Mean running sequences per decode instance."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        counts = (self.requests, self.prompt_tokens, self.computed_tokens, self.output_tokens)
        if min(*counts, self.finished) < 0:
            raise ValueError("counts must be >= 0")
        if self.computed_tokens > self.prompt_tokens:
            raise ValueError("computed_tokens cannot exceed prompt_tokens")


@dataclass(frozen=True, slots=True)
class LoadForecast:
    """The load expected when an engine started now would serve: a rate and per-request means."""

    rate_rps: float
    prompt_tokens: float
    computed_tokens: float
    output_tokens: float


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    """One validated config of the planner (docs/design/planner.md)."""

    ttft_slo_s: float
    tpot_slo_s: float
    max_num_seqs: int
    """An engine's most running sequences."""
    kv_capacity_tokens: int
    """KV tokens one engine holds."""
    gpus_per_instance: int = 1
    max_instances: int = 1 << 20
    """Budget: prefill + decode instances at most."""
    min_prefill: int = 1
    min_decode: int = 1
    interval_s: float = 60.0
    engine_start_s: float = 60.0
    """From asking for an engine to its first request: the forecast's horizon beyond the
    interval."""
    scale_down_after: int = 3
    """Consecutive intervals that must all ask for a smaller pool before it shrinks."""
    attainment: float = 0.9
    """The quantile of TTFT the prefill pool is sized for."""

    def __post_init__(self) -> None:
        for name in ("ttft_slo_s", "tpot_slo_s", "interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value}")
        if not (math.isfinite(self.engine_start_s) and self.engine_start_s >= 0):
            raise ValueError(f"engine_start_s must be >= 0, got {self.engine_start_s}")
        if self.max_num_seqs < 1 or self.kv_capacity_tokens < 1 or self.gpus_per_instance < 1:
            raise ValueError("max_num_seqs, kv_capacity_tokens and gpus_per_instance must be >= 1")
        if self.min_prefill < 0 or self.min_decode < 1:
            raise ValueError("min_prefill must be >= 0 and min_decode >= 1")
        if self.max_instances < self.min_prefill + self.min_decode:
            raise ValueError("max_instances must hold min_prefill + min_decode")
        if self.scale_down_after < 1:
            raise ValueError("scale_down_after must be >= 1")
        if not 0.0 < self.attainment < 1.0:
            raise ValueError(f"attainment must be in (0, 1), got {self.attainment}")


@dataclass(frozen=True, slots=True)
class PoolView:
    """The pools as the gateway sees them when it plans."""

    sizes: PoolSizes
    """Prefill and decode workers ready or starting."""
    prefill_model: LatencyModel | None
    """A ready prefill worker's latency model (a calibrated one first); a ready decode worker's
    when no prefill worker is ready (the same model and hardware); None: no worker is ready."""
    decode_model: LatencyModel | None
    decode_batch: float | None
    """Mean running sequences per ready decode worker (None: none is ready)."""
    max_num_seqs: int
    """The smallest capacity among ready decode workers (0: unknown)."""
    kv_capacity_tokens: int
    """The smallest KV capacity among ready decode workers (0: unknown)."""
