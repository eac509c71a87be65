"""The P:D planner: both pools sized from a load forecast with the scheduler's latency model
(docs/design/planner.md). Pure: no I/O, no clock; the caller feeds samples and applies targets.

Layers: ``planner`` > ``policies`` > ``forecast`` | ``meter`` > ``types``.
"""

from controlplane.planning.forecast import ConstantForecast, Forecaster, HoltForecast
from controlplane.planning.meter import LoadMeter
from controlplane.planning.planner import PLANNER_NAMES, PoolPlanner, make_planner
from controlplane.planning.policies import DynamoSla, SizingPolicy, SloModel
from controlplane.planning.types import (
    LatencyModel,
    LoadForecast,
    LoadSample,
    PlannerConfig,
    PoolSizes,
    PoolView,
    SplitLatencyModel,
)

__all__ = [
    "PLANNER_NAMES",
    "ConstantForecast",
    "DynamoSla",
    "Forecaster",
    "HoltForecast",
    "LatencyModel",
    "LoadForecast",
    "LoadMeter",
    "LoadSample",
    "PlannerConfig",
    "PoolPlanner",
    "PoolSizes",
    "PoolView",
    "SizingPolicy",
    "SloModel",
    "SplitLatencyModel",
    "make_planner",
]
