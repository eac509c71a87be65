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


class _Means:
    """Per-request prompt and computed tokens (from arrivals) and output tokens (from finished
    requests), each smoothed exponentially from its first observation (``alpha`` 1: the last)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.prompt: float | None = None
        self.computed: float | None = None
        self.output: float | None = None

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else self.alpha * new + (1 - self.alpha) * old

    def observe(self, sample: LoadSample) -> None:
        if sample.requests:
            self.prompt = self._smooth(self.prompt, sample.prompt_tokens / sample.requests)
            self.computed = self._smooth(self.computed, sample.computed_tokens / sample.requests)
        if sample.finished:
            self.output = self._smooth(self.output, sample.output_tokens / sample.finished)

    def forecast(self, rate: float) -> LoadForecast:
        """0 for what was never seen (nothing to size for yet)."""
        return LoadForecast(rate, self.prompt or 0.0, self.computed or 0.0, self.output or 0.0)


class ConstantForecast:
    """The next interval is the last one (Dynamo's ``constant`` load predictor): its rate and
    its last known token means."""

    def __init__(self) -> None:
        self._rate: float | None = None
        self._means = _Means(alpha=1.0)

    def observe(self, sample: LoadSample) -> None:
        self._rate = sample.requests / sample.duration_s
        self._means.observe(sample)

    def forecast(self, horizon_s: float) -> LoadForecast | None:
        if self._rate is None:
            return None
        return self._means.forecast(self._rate)


class HoltForecast:
    """Holt's linear exponential smoothing of the rate (level and trend per interval), simple
    exponential smoothing of the per-request token means."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.3, means_alpha: float = 0.3) -> None:
        for name, value in (("alpha", alpha), ("beta", beta), ("means_alpha", means_alpha)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        self.alpha, self.beta = alpha, beta
        self._level: float | None = None
        self._trend = 0.0
        self._interval_s = 0.0
        self._means = _Means(means_alpha)

    def observe(self, sample: LoadSample) -> None:
        rate = sample.requests / sample.duration_s
        self._interval_s = sample.duration_s
        if self._level is None:
            self._level = rate
        else:
            previous = self._level
            self._level = self.alpha * rate + (1 - self.alpha) * (previous + self._trend)
            self._trend = self.beta * (self._level - previous) + (1 - self.beta) * self._trend
        self._means.observe(sample)

    def forecast(self, horizon_s: float) -> LoadForecast | None:
        if self._level is None:
            return None
        steps = horizon_s / self._interval_s if self._interval_s else 0.0
        return self._means.forecast(max(0.0, self._level + steps * self._trend))
