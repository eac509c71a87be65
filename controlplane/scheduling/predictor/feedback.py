"""What the online refits are made of: rolling medians of the overheads, the level shift of
the fixed cost (weighted median of recent residuals) and the training set of a refit."""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from controlplane.scheduling.predictor.fitting import Sample, well_determined

FloatArray = npt.NDArray[np.float64]


# -- overheads ---------------------------------------------------------------------------------

LEVEL_WINDOW: Final = 8
"""Recent observations whose median residual moves a fit's fixed cost (the level)."""
LEVEL_MIN_OBSERVATIONS: Final = 4

CHANGE_FACTOR: Final = 3.0
"""An observation off the model in use by more than this factor (either way) disagrees with it."""
CHANGE_RUN: Final = 3
"""Consecutive disagreeing observations (all slower or all faster) that make a change point: the
model is rescaled to them at once (:class:`ChangeDetector`)."""

OVERHEAD_WINDOW: Final = 64
"""Observations behind :attr:`LatencyPredictor.ttft_overhead_s` and ``handoff_s``."""
OVERHEAD_MIN_OBSERVATIONS: Final = 8
"""Observations needed before their median replaces the seed (the profile's measurement)."""


class RollingMedian:
    """Median of the last ``window`` values, clamped at >= 0; the seed stands in until
    ``min_count`` values were seen (one or two are noise, not an estimate).

    A median, not a mean: these overheads have a long tail (a garbage collection, a context
    switch on a busy host) that a mean would spread over every prediction, and the median of an
    additive term is what minimises the absolute error of the sum.
    """

    __slots__ = ("_median", "_min_count", "_seed", "_values")

    def __init__(self, window: int, min_count: int = 1) -> None:
        if not 1 <= min_count <= window:
            raise ValueError("need 1 <= min_count <= window")
        self._values: deque[float] = deque(maxlen=window)
        self._min_count = min_count
        self._seed = 0.0
        self._median: float | None = None
        """The median of ``_values``, until the next value (read in every decision, for every
        instance: sorting the window each time cost ~0.7 ms a decision at 256 instances)."""

    def seed(self, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"seed must be finite, got {value}")
        self._seed = max(0.0, value)

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"observation must be finite, got {value}")
        self._values.append(value)
        self._median = None

    @property
    def value(self) -> float:
        values = self._values
        if len(values) < self._min_count:
            return self._seed
        if self._median is None:
            ordered = sorted(values)
            middle = len(ordered) // 2
            if len(ordered) % 2:
                self._median = max(0.0, ordered[middle])
            else:
                self._median = max(0.0, (ordered[middle - 1] + ordered[middle]) / 2.0)
        return self._median

    @property
    def floor(self) -> float:
        """The lower of the seed and :attr:`value`: the overhead in quiet conditions (the
        profile measures it on an idle engine; a busy host only adds to it)."""
        return min(self._seed, self.value)

    def __len__(self) -> int:
        return len(self._values)


def level_s(window: deque[Sample], predict_s: Callable[[int, int], float]) -> float:
    """Weighted median of the recent residuals ``observed - fit``, weights ``1/observed``: the
    shift ``L`` that minimises ``sum |fit + L - observed| / observed`` (the MAPE of the moved
    model over these observations)."""
    if len(window) < LEVEL_MIN_OBSERVATIONS:
        return 0.0
    start = max(0, len(window) - LEVEL_WINDOW)
    weighted = sorted(
        (s.seconds - predict_s(s[0], s[1]), 1.0 / s.seconds)
        for s in itertools.islice(window, start, None)
    )
    half = sum(weight for _, weight in weighted) / 2.0
    cumulative = 0.0
    for residual, weight in weighted:
        cumulative += weight
        if cumulative >= half:
            return residual
    return weighted[-1][0]  # not reached: the weights sum to 2·half


def training_set(
    window: deque[Sample],
    profile: Iterable[Sample],
    features: Callable[[Sequence[Sample]], tuple[FloatArray, FloatArray]],
) -> list[Sample]:
    recent = list(window)
    if recent and len(recent) == window.maxlen and well_determined(features(recent)[0]):
        return recent
    training = list(profile)
    training.extend(recent)
    return training


class ChangeDetector:
    """The change-point rule of the online refit: ``run`` consecutive observations whose ratio
    observed / predicted lies beyond ``factor`` on the same side (all slower or all faster) mean
    the model is wrong by a factor (a poisoned profile, an engine that changed speed), not noisy:
    :meth:`observe` then answers the median of their ratios, the scale that the model's
    coefficients are multiplied by. The level (an additive shift, LEVEL_WINDOW observations) and
    the refits (every ``refit_every``) are too slow for that, and an additive shift cannot undo
    a model that is 10x too slow (the fixed cost stops at 0)."""

    __slots__ = ("_factor", "_ratios", "_run")

    def __init__(self, factor: float = CHANGE_FACTOR, run: int = CHANGE_RUN) -> None:
        if not (math.isfinite(factor) and factor > 1.0) or run < 1:
            raise ValueError("need a change factor > 1 and a run >= 1")
        self._factor = factor
        self._run = run
        self._ratios: list[float] = []

    def observe(self, observed_s: float, predicted_s: float) -> float | None:
        """One observation against the model's prediction; the scale to apply when it completes
        a run, else None."""
        if not (predicted_s > 0.0 and math.isfinite(predicted_s)):
            return None
        ratio = observed_s / predicted_s
        if 1.0 / self._factor <= ratio <= self._factor:
            self._ratios.clear()
            return None
        if self._ratios and (self._ratios[-1] > 1.0) != (ratio > 1.0):
            self._ratios.clear()
        self._ratios.append(ratio)
        if len(self._ratios) < self._run:
            return None
        ordered = sorted(self._ratios)
        self._ratios.clear()
        middle = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[middle]
        return math.sqrt(ordered[middle - 1] * ordered[middle])

    def consistent(
        self, window: deque[Sample], predict_s: Callable[[int, int], float]
    ) -> deque[Sample]:
        """The observations of ``window`` that the rescaled model explains within the factor:
        the others were taken before the change (another regime) and would drag the level and
        the next refit back."""
        kept = (
            s
            for s in window
            if 1.0 / self._factor <= s.seconds / max(predict_s(s[0], s[1]), 1e-12) <= self._factor
        )
        return deque(kept, maxlen=window.maxlen)

    def reset(self) -> None:
        self._ratios.clear()


def rescaled(samples: tuple[Sample, ...], scale: float) -> tuple[Sample, ...]:
    """``samples`` with every time multiplied by ``scale`` (profile anchors after a change
    point: they keep the profile's shape at the speed observed now)."""
    return tuple(s._replace(seconds=s.seconds * scale) for s in samples)
