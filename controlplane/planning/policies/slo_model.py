"""Strata's sizing (docs/design/planner.md §3): the scheduler's latency model, only computed
prompt tokens costing prefill time, an M/M/1 tail for TTFT, Little's law for decode."""

from __future__ import annotations

import math

from controlplane.planning.policies.base import best_decode_batch
from controlplane.planning.types import (
    LatencyModel,
    LoadForecast,
    LoadSample,
    PlannerConfig,
    PoolSizes,
)

__all__ = ["MIN_UTILIZATION", "SloModel"]

MIN_UTILIZATION = 0.05
"""The utilisation a prefill instance is sized for when one mean prompt alone nearly fills the
TTFT budget."""


class SloModel:
    def __init__(self, config: PlannerConfig) -> None:
        self.config = config

    def prefill_utilization(self, prefill_s: float) -> float:
        """The largest utilisation at which an M/M/1 prefill instance meets the TTFT SLO at the
        configured quantile: ``1 - ln(1/(1-q))·t/TTFT``."""
        c = self.config
        rho = 1.0 - math.log(1.0 / (1.0 - c.attainment)) * prefill_s / c.ttft_slo_s
        return max(MIN_UTILIZATION, rho)

    def size(
        self, forecast: LoadForecast, model: LatencyModel, last: LoadSample | None
    ) -> PoolSizes:
        c = self.config
        rate = forecast.rate_rps
        if rate <= 0:
            return PoolSizes(0, 0)
        computed = max(1, round(forecast.computed_tokens))
        cached = max(0, round(forecast.prompt_tokens) - computed)
        prefill_s = model.prefill_s(computed, cached)
        prefill = math.ceil(rate * prefill_s / self.prefill_utilization(prefill_s))
        context = forecast.prompt_tokens + forecast.output_tokens / 2
        batch = best_decode_batch(
            model,
            c.tpot_slo_s,
            context,
            forecast.prompt_tokens + forecast.output_tokens,
            c.max_num_seqs,
            c.kv_capacity_tokens,
        )
        step_s = model.decode_step_s(batch, round(batch * context))
        running = rate * forecast.output_tokens * step_s
        return PoolSizes(prefill, math.ceil(running / batch))
