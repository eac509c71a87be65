"""The planner (docs/design/planner.md §1): forecast, size, bound, hysteresis. Pure."""

from __future__ import annotations

import dataclasses
from collections import deque

from controlplane.planning.forecast import ConstantForecast, Forecaster, HoltForecast
from controlplane.planning.policies import DynamoSla, SizingPolicy, SloModel
from controlplane.planning.types import LatencyModel, LoadSample, PlannerConfig, PoolSizes

__all__ = ["PLANNER_NAMES", "PoolPlanner", "make_planner"]

PLANNER_NAMES = ("strata", "dynamo")
"""``strata``: Holt forecast, ``slo_model`` sizing, hysteresis; ``dynamo``: Dynamo's SLA planner
(constant forecast, its formulas, applied every interval). Fixed pools need no planner."""


class PoolPlanner:
    """One planner of one model's prefill and decode pools. :meth:`plan` once per interval."""

    def __init__(
        self,
        config: PlannerConfig,
        sizing: SizingPolicy,
        forecaster: Forecaster,
        *,
        hysteresis: bool = True,
    ) -> None:
        self.config = config
        self.sizing = sizing
        self.forecaster = forecaster
        self.hysteresis = hysteresis
        self._recent: deque[PoolSizes] = deque(maxlen=config.scale_down_after)

    def set_limits(self, max_num_seqs: int, kv_capacity_tokens: int) -> None:
        """The engines' limits changed (a worker of another size joined): the forecast and the
        hysteresis window carry on."""
        self.config = dataclasses.replace(
            self.config, max_num_seqs=max_num_seqs, kv_capacity_tokens=kv_capacity_tokens
        )

    def bounded(self, sizes: PoolSizes) -> PoolSizes:
        """Each pool within its minimum, the sum within the budget (both pools shrunk in
        proportion, each keeping its minimum)."""
        c = self.config
        prefill = max(c.min_prefill, sizes.prefill)
        decode = max(c.min_decode, sizes.decode)
        if prefill + decode <= c.max_instances:
            return PoolSizes(prefill, decode)
        share = prefill / (prefill + decode)
        prefill = min(
            c.max_instances - c.min_decode,
            max(c.min_prefill, round(c.max_instances * share)),
        )
        return PoolSizes(prefill, c.max_instances - prefill)

    def plan(self, sample: LoadSample, current: PoolSizes, model: LatencyModel) -> PoolSizes:
        """The pools to have, given the interval just ended and the pools now (ready and
        starting, not draining)."""
        c = self.config
        self.forecaster.observe(sample)
        forecast = self.forecaster.forecast(c.interval_s + c.engine_start_s)
        if forecast is None:
            return self.bounded(current)
        target = self.bounded(self.sizing.size(forecast, model, sample, c))
        if not self.hysteresis:
            return target
        self._recent.append(target)
        # Up at once; down only when every recent target asked for less, to the largest of them.
        full = len(self._recent) == self._recent.maxlen
        prefill = self._held(current.prefill, target.prefill, [t.prefill for t in self._recent])
        decode = self._held(current.decode, target.decode, [t.decode for t in self._recent])
        if not full:
            prefill = max(prefill, current.prefill)
            decode = max(decode, current.decode)
        if prefill + decode > c.max_instances:
            # The budget binds while one pool is held: the other grows into what is left.
            if target.prefill > current.prefill:
                prefill = max(c.min_prefill, c.max_instances - decode)
            elif target.decode > current.decode:
                decode = max(c.min_decode, c.max_instances - prefill)
        return self.bounded(PoolSizes(prefill, decode))

    @staticmethod
    def _held(current: int, target: int, window: list[int]) -> int:
        return target if target >= current else min(current, max(window))


def make_planner(name: str, config: PlannerConfig) -> PoolPlanner:
    if name == "strata":
        return PoolPlanner(config, SloModel(), HoltForecast())
    if name == "dynamo":
        return PoolPlanner(config, DynamoSla(), ConstantForecast(), hysteresis=False)
    raise ValueError(f"unknown planner {name!r}; one of {', '.join(PLANNER_NAMES)}")
