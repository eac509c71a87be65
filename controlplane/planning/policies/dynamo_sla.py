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

_TINY_S = 1e-9
"""A model's time is never taken as less (a zero coefficient set would divide by zero)."""


class DynamoSla:
    def size(
        self,
        forecast: LoadForecast,
        model: LatencyModel,
        last: LoadSample | None,
        config: PlannerConfig,
    ) -> PoolSizes:
        g = config.gpus_per_instance
        rate = forecast.rate_rps
        if rate <= 0:
            return PoolSizes(0, 0)
        isl = max(1, round(forecast.prompt_tokens))
        osl = max(1.0, forecast.output_tokens)
        context = isl + osl / 2
        expected_ttft = max(_TINY_S, model.prefill_s(isl, 0))
        prefill_correction = 1.0
        decode_correction = 1.0
        if last is not None and last.ttft_s is not None:
            prefill_correction = last.ttft_s / expected_ttft
        if last is not None and last.itl_s is not None and last.decode_batch:
            b = max(1, round(last.decode_batch))
            expected_itl = max(_TINY_S, model.decode_step_s(b, round(b * context)))
            decode_correction = last.itl_s / expected_itl
        prefill_per_gpu = isl / expected_ttft / g
        load = rate * isl * min(1.0, prefill_correction)
        prefill = math.ceil(load / prefill_per_gpu / g)
        itl = config.tpot_slo_s / decode_correction if decode_correction > 0 else config.tpot_slo_s
        batch = best_decode_batch(
            model, itl, context, isl + osl, config.max_num_seqs, config.kv_capacity_tokens
        )
        step_s = max(_TINY_S, model.decode_step_s(batch, round(batch * context)))
        decode_per_gpu = batch / step_s / g
        decode = math.ceil(rate * osl / decode_per_gpu / g)
        return PoolSizes(prefill, decode)
