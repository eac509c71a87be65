"""How good the predictions are: rolling MAPE of predicted against observed TTFT and TPOT."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


# -- accuracy ----------------------------------------------------------------------------------


class PredictionAccuracy:
    """Rolling mean absolute percentage error of predicted against observed TTFT and TPOT.

    ``ttft_mape`` and ``tpot_mape`` are fractions (0.12 = 12 %) over the last ``window``
    observations of each, or None before the first; the gateway exports them as gauges.
    """

    __slots__ = ("_tpot", "_ttft")

    def __init__(self, window: int = 1000) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._ttft: deque[float] = deque(maxlen=window)
        self._tpot: deque[float] = deque(maxlen=window)

    def observe_ttft(self, predicted_s: float, observed_s: float) -> None:
        self._ttft.append(relative_error(predicted_s, observed_s))

    def observe_tpot(self, predicted_s: float, observed_s: float) -> None:
        self._tpot.append(relative_error(predicted_s, observed_s))

    @property
    def ttft_mape(self) -> float | None:
        return sum(self._ttft) / len(self._ttft) if self._ttft else None

    @property
    def tpot_mape(self) -> float | None:
        return sum(self._tpot) / len(self._tpot) if self._tpot else None

    @property
    def num_ttft(self) -> int:
        return len(self._ttft)

    @property
    def num_tpot(self) -> int:
        return len(self._tpot)


def relative_error(predicted_s: float, observed_s: float) -> float:
    if not (math.isfinite(predicted_s) and predicted_s >= 0.0):
        raise ValueError(f"predicted time must be finite and >= 0, got {predicted_s}")
    if not (math.isfinite(observed_s) and observed_s > 0.0):
        raise ValueError(f"observed time must be finite and > 0, got {observed_s}")
    return abs(predicted_s - observed_s) / observed_s
