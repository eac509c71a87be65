"""Load forecasts (docs/design/planner.md §2): from each interval's :class:`LoadSample`, the
load ``horizon_s`` ahead."""

from __future__ import annotations

from typing import Protocol

from controlplane.planning.types import LoadForecast, LoadSample

__all__ = ["ConstantForecast", "Forecaster", "HoltForecast"]


class Forecaster(Protocol):
    def observe(self, sample: LoadSample) -> None: ...

    def forecast(self, horizon_s: float) -> LoadForecast | None:
        """None before the first sample."""
        ...


def _means(sample: LoadSample) -> tuple[float, float, float] | None:
    if not sample.requests:
        return None
    n = sample.requests
    return sample.prompt_tokens / n, sample.computed_tokens / n, sample.output_tokens / n


class ConstantForecast:
    """The next interval is the last one (Dynamo's ``constant`` load predictor); the token
    means are the last interval that had requests."""

    def __init__(self) -> None:
        self._rate: float | None = None
        self._means = (0.0, 0.0, 0.0)

    def observe(self, sample: LoadSample) -> None:
        self._rate = sample.requests / sample.duration_s
        self._means = _means(sample) or self._means

    def forecast(self, horizon_s: float) -> LoadForecast | None:
        if self._rate is None:
            return None
        return LoadForecast(self._rate, *self._means)


class HoltForecast:
    """Holt's linear exponential smoothing of the rate (level and trend per interval), simple
    exponential smoothing of the per-request token means."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.3, means_alpha: float = 0.3) -> None:
        for name, value in (("alpha", alpha), ("beta", beta), ("means_alpha", means_alpha)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        self.alpha, self.beta, self.means_alpha = alpha, beta, means_alpha
        self._level: float | None = None
        self._trend = 0.0
        self._interval_s = 0.0
        self._means: tuple[float, float, float] | None = None

    def observe(self, sample: LoadSample) -> None:
        rate = sample.requests / sample.duration_s
        self._interval_s = sample.duration_s
        if self._level is None:
            self._level = rate
        else:
            previous = self._level
            self._level = self.alpha * rate + (1 - self.alpha) * (previous + self._trend)
            self._trend = self.beta * (self._level - previous) + (1 - self.beta) * self._trend
        means = _means(sample)
        if means is not None:
            if self._means is None:
                self._means = means
            else:
                a = self.means_alpha
                self._means = (
                    a * means[0] + (1 - a) * self._means[0],
                    a * means[1] + (1 - a) * self._means[1],
                    a * means[2] + (1 - a) * self._means[2],
                )

    def forecast(self, horizon_s: float) -> LoadForecast | None:
        if self._level is None:
            return None
        steps = horizon_s / self._interval_s if self._interval_s else 0.0
        rate = max(0.0, self._level + steps * self._trend)
        return LoadForecast(rate, *(self._means or (0.0, 0.0, 0.0)))
