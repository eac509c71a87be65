"""Baseline: Dynamo's SLA planner, as its documentation states it (docs/design/planner.md §3).
The profile interpolators are the same latency model Strata's rule uses (the same information);
correction factors from the last interval; no queueing headroom, no prefix-cache term but the
correction's ``min(1, ·)``."""

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

__all__ = ["DynamoSla"]


class DynamoSla:
    def __init__(self, config: PlannerConfig) -> None:
        self.config = config

    def size(
        self, forecast: LoadForecast, model: LatencyModel, last: LoadSample | None
    ) -> PoolSizes:
        c, g = self.config, self.config.gpus_per_instance
        rate = forecast.rate_rps
        if rate <= 0:
            return PoolSizes(0, 0)
        isl = max(1, round(forecast.prompt_tokens))
        osl = max(1.0, forecast.output_tokens)
        context = isl + osl / 2
        expected_ttft = model.prefill_s(isl, 0)
        prefill_correction = 1.0
        decode_correction = 1.0
        if last is not None and last.ttft_s is not None and expected_ttft > 0:
            prefill_correction = last.ttft_s / expected_ttft
        if last is not None and last.itl_s is not None and last.decode_batch:
            b = max(1, round(last.decode_batch))
            expected_itl = model.decode_step_s(b, round(b * context))
            if expected_itl > 0:
                decode_correction = last.itl_s / expected_itl
        prefill_per_gpu = isl / expected_ttft / g
        load = rate * isl * min(1.0, prefill_correction)
        prefill = math.ceil(load / prefill_per_gpu / g)
        itl = c.tpot_slo_s / decode_correction if decode_correction > 0 else c.tpot_slo_s
        batch = best_decode_batch(
            model, itl, context, isl + osl, c.max_num_seqs, c.kv_capacity_tokens
        )
        decode_per_gpu = batch / model.decode_step_s(batch, round(batch * context)) / g
        decode = math.ceil(rate * osl / decode_per_gpu / g)
        return PoolSizes(prefill, decode)
