"""Baseline: fixed pools, whatever the load."""

from __future__ import annotations

from controlplane.planning.types import LatencyModel, LoadForecast, LoadSample, PoolSizes

__all__ = ["FixedSizes"]


class FixedSizes:
    def __init__(self, sizes: PoolSizes) -> None:
        self.sizes = sizes

    def size(
        self, forecast: LoadForecast, model: LatencyModel, last: LoadSample | None
    ) -> PoolSizes:
        return self.sizes
