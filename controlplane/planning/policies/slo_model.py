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

__all__ = ["MIN_UTILIZATION", "UNATTAINABLE_UTILIZATION", "SloModel"]

MIN_UTILIZATION = 0.25
"""The lowest utilisation a prefill instance is sized for: below it the TTFT tail would cost more
than four times the GPUs the load needs."""
UNATTAINABLE_UTILIZATION = 0.8
"""The utilisation sized for when one mean prompt alone exceeds the TTFT budget: no pool size
promises the SLO for it, so the pool carries the load and admission refuses what cannot meet
it."""


class SloModel:
    @staticmethod
    def prefill_utilization(prefill_s: float, budget_s: float, attainment: float) -> float:
        """The largest utilisation at which an M/M/1 prefill instance answers within
        ``budget_s`` at quantile ``attainment``: ``1 - ln(1/(1-q))·t/budget``, bounded below
        by :data:`MIN_UTILIZATION`; :data:`UNATTAINABLE_UTILIZATION` when ``t >= budget``."""
        if prefill_s >= budget_s:
            return UNATTAINABLE_UTILIZATION
        rho = 1.0 - math.log(1.0 / (1.0 - attainment)) * prefill_s / budget_s
        return max(MIN_UTILIZATION, rho)

    def size(
        self,
        forecast: LoadForecast,
        model: LatencyModel,
        last: LoadSample | None,
        config: PlannerConfig,
    ) -> PoolSizes:
        rate = forecast.rate_rps
        if rate <= 0:
            return PoolSizes(0, 0)
        computed = max(1, round(forecast.computed_tokens))
        cached = max(0, round(forecast.prompt_tokens) - computed)
        prefill_s = model.prefill_s(computed, cached)
        # The TTFT the engine may take: the SLO less what the model says every request adds
        # beyond the engine (the gateway, the hand-off), as the scheduler predicts TTFT.
        budget_s = max(1e-6, config.ttft_slo_s - model.ttft_overhead_s)
        utilization = self.prefill_utilization(prefill_s, budget_s, config.attainment)
        prefill = math.ceil(rate * prefill_s / utilization)
        context = forecast.prompt_tokens + forecast.output_tokens / 2
        batch = best_decode_batch(
            model,
            config.tpot_slo_s,
            context,
            forecast.prompt_tokens + forecast.output_tokens,
            config.max_num_seqs,
            config.kv_capacity_tokens,
        )
        step_s = model.decode_step_s(batch, round(batch * context))
        running = rate * forecast.output_tokens * step_s
        return PoolSizes(prefill, math.ceil(running / batch))
