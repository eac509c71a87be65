"""The planner (docs/design/planner.md §1): forecast, size, bound, hysteresis. Pure."""

from __future__ import annotations

from collections import deque

from controlplane.planning.forecast import ConstantForecast, Forecaster, HoltForecast
from controlplane.planning.policies import DynamoSla, FixedSizes, SizingPolicy, SloModel
from controlplane.planning.types import LatencyModel, LoadSample, PlannerConfig, PoolSizes

__all__ = ["PLANNER_NAMES", "PoolPlanner", "make_planner"]

PLANNER_NAMES = ("strata", "dynamo", "fixed")
"""``strata``: Holt forecast, ``slo_model`` sizing, hysteresis; ``dynamo``: Dynamo's SLA planner
(constant forecast, its formulas, applied every interval); ``fixed``: the same pools always."""


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
        self.forecaster.observe(sample)
        forecast = self.forecaster.forecast(self.config.interval_s + self.config.engine_start_s)
        if forecast is None:
            return current
        target = self.bounded(self.sizing.size(forecast, model, sample))
        if not self.hysteresis:
            return target
        self._recent.append(target)
        # Up at once; down only when every recent target asked for less, to the largest of them.
        window = list(self._recent)
        settled_prefill = max(t.prefill for t in window)
        settled_decode = max(t.decode for t in window)
        full = len(window) == self._recent.maxlen
        prefill = (
            target.prefill
            if target.prefill >= current.prefill
            else (min(current.prefill, settled_prefill) if full else current.prefill)
        )
        decode = (
            target.decode
            if target.decode >= current.decode
            else (min(current.decode, settled_decode) if full else current.decode)
        )
        return self.bounded(PoolSizes(prefill, decode))


def make_planner(name: str, config: PlannerConfig, fixed: PoolSizes | None = None) -> PoolPlanner:
    if name == "strata":
        return PoolPlanner(config, SloModel(config), HoltForecast())
    if name == "dynamo":
        return PoolPlanner(config, DynamoSla(config), ConstantForecast(), hysteresis=False)
    if name == "fixed":
        if fixed is None:
            raise ValueError("the fixed planner needs its pool sizes")
        return PoolPlanner(config, FixedSizes(fixed), ConstantForecast(), hysteresis=False)
    raise ValueError(f"unknown planner {name!r}; one of {', '.join(PLANNER_NAMES)}")
