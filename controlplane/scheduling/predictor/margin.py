"""The admission margin: how much slower than predicted an instance's recent TTFTs were.

Predictions are means. Admitting every request whose predicted TTFT just meets its SLO puts
about half of the admitted ones above it, and the tail far above it under load (queueing and a
shared host's noise multiply what the model misses). :class:`TailRatio` keeps the recent ratios
of observed to predicted TTFT of one instance; the SLO-aware policy scales a busy instance's
prediction by their ``q``-quantile before comparing it with the SLO (docs/design/scheduling.md
§4, "Margin"), so that the admitted requests' ``q``-quantile, not their mean, meets it.

Ratios expire after ``max_age_s``: a margin learned in a burst must not refuse work long after
the burst (while everything is refused no new ratio arrives to lower it).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Final

__all__ = ["MARGIN_MAX_AGE_S", "MARGIN_MIN_OBSERVATIONS", "MARGIN_WINDOW", "TailRatio"]

MARGIN_WINDOW: Final = 128
"""Most recent ratios kept."""
MARGIN_MAX_AGE_S: Final = 30.0
"""Ratios older than this are forgotten."""
MARGIN_MIN_OBSERVATIONS: Final = 8
"""Fewer live ratios than this are noise, not a tail: the margin is 1."""


class TailRatio:
    """The ``q``-quantile of recent observed/predicted ratios, at least 1 (a model that runs
    slow is corrected; one that runs fast is not trusted to admit more than it predicts).

    Pure: the caller passes the time (the gateway's monotonic clock).
    """

    __slots__ = ("_by_time", "_max_age_s", "_min_count", "_sorted", "_window")

    def __init__(
        self,
        window: int = MARGIN_WINDOW,
        max_age_s: float = MARGIN_MAX_AGE_S,
        min_count: int = MARGIN_MIN_OBSERVATIONS,
    ) -> None:
        if not 1 <= min_count <= window:
            raise ValueError("need 1 <= min_count <= window")
        if not (math.isfinite(max_age_s) and max_age_s > 0.0):
            raise ValueError(f"max_age_s must be finite and > 0, got {max_age_s}")
        self._by_time: deque[tuple[float, float]] = deque()
        self._sorted: list[float] = []
        self._max_age_s = max_age_s
        self._min_count = min_count
        self._window = window

    def add(self, predicted_s: float, observed_s: float, now: float) -> None:
        """One request's TTFT against its prediction (ignored unless both are > 0 and finite)."""
        if (
            not (math.isfinite(predicted_s) and predicted_s > 0 and math.isfinite(observed_s))
            or observed_s <= 0
        ):
            return
        ratio = observed_s / predicted_s
        if not math.isfinite(ratio):
            return  # a vanishing prediction
        if len(self._by_time) == self._window:
            self._drop_oldest()
        self._by_time.append((now, ratio))
        bisect.insort(self._sorted, ratio)

    def quantile(self, q: float, now: float) -> float:
        """The ``q``-quantile (nearest rank) of the live ratios, at least 1; 1 with fewer than
        the minimum or ``q`` = 0."""
        self._expire(now)
        values = self._sorted
        if q <= 0.0 or len(values) < self._min_count:
            return 1.0
        rank = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
        return max(1.0, values[rank])

    def __len__(self) -> int:
        return len(self._by_time)

    def _expire(self, now: float) -> None:
        horizon = now - self._max_age_s
        while self._by_time and self._by_time[0][0] < horizon:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, ratio = self._by_time.popleft()
        del self._sorted[bisect.bisect_left(self._sorted, ratio)]
