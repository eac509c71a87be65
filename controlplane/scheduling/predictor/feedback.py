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

    __slots__ = ("_min_count", "_seed", "_values")

    def __init__(self, window: int, min_count: int = 1) -> None:
        if not 1 <= min_count <= window:
            raise ValueError("need 1 <= min_count <= window")
        self._values: deque[float] = deque(maxlen=window)
        self._min_count = min_count
        self._seed = 0.0

    def seed(self, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"seed must be finite, got {value}")
        self._seed = max(0.0, value)

    def add(self, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"observation must be finite, got {value}")
        self._values.append(value)

    @property
    def value(self) -> float:
        values = self._values
        if len(values) < self._min_count:
            return self._seed
        ordered = sorted(values)
        middle = len(ordered) // 2
        if len(ordered) % 2:
            return max(0.0, ordered[middle])
        return max(0.0, (ordered[middle - 1] + ordered[middle]) / 2.0)

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
