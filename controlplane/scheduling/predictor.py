"""Per-instance latency model: prefill time, decode step time, KV transfer time.

The scheduler predicts what a choice of instances would cost from three small linear models per
instance (docs/design/scheduling.md §2 has the derivation, the priors and a worked example):

* **Prefill** of ``n`` new (uncached) tokens after ``c`` cached ones::

      prefill_s(n, c) = a0 + a1·n + a2·c + a3·A(n, c),   A(n, c) = n·c + n·(n + 1)/2

  ``a1·n`` is the weight-bound work per new token, ``a2·c`` the per-token cost of attaching the
  cached context (block tables, the cached part of the KV read), and ``A`` counts the query-key
  pairs of causal attention over the new tokens (each new token ``i`` attends ``c + i`` tokens):
  the term that makes long prompts superlinear.
* **Decode step** of a running batch of ``b`` sequences holding ``k`` context tokens in all::

      step_s(b, k) = d0 + d1·b + d2·k

* **Transfer** of ``x`` bytes over a transport (shared memory, TCP, RDMA) or from SSD::

      transfer_s(x) = latency_s + x / bytes_per_s

From these the policies build TTFT and TPOT predictions (policy.py). Work already queued on an
instance (``t`` uncached prompt tokens in ``r`` requests) is predicted with the same prefill model,
as ``r`` prompts of ``t/r`` tokens each with nothing cached:
``queue_s(t, r) = a0·r + a1·t + a3·t·(t/r + 1)/2``.

**Calibration.** :meth:`ProfilePlan.for_engine` lists the (new, cached) and (batch, context)
points to time when a worker becomes ready; :func:`fit_prefill` and :func:`fit_decode` fit them by
least squares with non-negative coefficients (:func:`fit_nonnegative`: every support subset is
solved and the best feasible one kept, which is exact NNLS for these 3-4 features).
:class:`LatencyPredictor` then refits online, every ``refit_every`` observations, from the profile
samples plus a bounded window of recent observations (the window alone once it is full and spans
enough shapes to determine every coefficient, so the model follows drift). Its prediction error is
tracked by :class:`PredictionAccuracy` as a rolling mean absolute percentage error.

**What is compared with what** (the MAPE is of the gateway's view; docs/design/scheduling.md
§2.2-2.3 has the measurements behind each choice):

* *TTFT* is observed at the gateway: HTTP arrival to first token. The prefill model predicts
  engine time (the worker's ``engine_time_s``), so the registry adds
  :attr:`LatencyPredictor.ttft_overhead_s` of the prefill instance: the median of recent
  ``TTFT - engine_time_s`` (gateway work + rpc), seeded by the profile's rpc overhead.
* *TPOT* is observed as ``(last token - first token) / (tokens - 1)``; its first gap is the
  decode instance taking the request over (Decode rpc, KV load, the last partial block
  recomputed: the pool holds whole blocks). :meth:`LatencyPredictor.transfer_s`, which the
  policy spreads over ``max_tokens - 1`` gaps, therefore includes
  :attr:`LatencyPredictor.handoff_s` (median of recent first-gap waits beyond a step).
* *Level*: engine times move with the regime (a busy neighbour on the same CPU doubled the
  tiny model's prefill): :attr:`LatencyPredictor.prefill` and ``decode`` are the fits with their
  fixed cost moved by the weighted median of the last ``LEVEL_WINDOW`` residuals (weights
  ``1/observed``: the shift that minimises their MAPE). Refits keep the shape (they need many
  shapes); the level follows the regime within a few requests.
* Only prefills that had their instance to themselves refit the prefill model (the registry
  knows): an overlapped one's engine time holds queueing, which the queue term predicts.

Pure computation: no I/O, no clocks, no threads. Each predictor belongs to one thread (the
gateway's event loop); the registry owns one per instance.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "PRIOR_DECODE",
    "PRIOR_PREFILL",
    "PRIOR_SSD_READ",
    "PRIOR_TRANSFERS",
    "DecodeCoefficients",
    "DecodeSample",
    "LatencyPredictor",
    "PredictionAccuracy",
    "PrefillCoefficients",
    "PrefillSample",
    "ProfilePlan",
    "RollingMedian",
    "TransferCoefficients",
    "Transport",
    "attention_pairs",
    "fit_decode",
    "fit_nonnegative",
    "fit_prefill",
]

FloatArray = npt.NDArray[np.float64]


class Transport(enum.Enum):
    """How KV bytes move between two endpoints (chosen per pair; see docs/design/kvstore.md)."""

    SHM = "shm"
    """Shared memory: the same host."""
    TCP = "tcp"
    RDMA = "rdma"


def attention_pairs(new_tokens: float, cached_tokens: float) -> float:
    """Query-key pairs of causal attention for ``new_tokens`` after ``cached_tokens``."""
    return new_tokens * cached_tokens + new_tokens * (new_tokens + 1.0) / 2.0


@dataclass(frozen=True, slots=True)
class PrefillCoefficients:
    """``prefill_s(n, c) = fixed_s + per_new_token_s·n + per_cached_token_s·c
    + per_attention_pair_s·(n·c + n·(n+1)/2)``; all non-negative."""

    fixed_s: float
    per_new_token_s: float
    per_cached_token_s: float
    per_attention_pair_s: float

    def __post_init__(self) -> None:
        _check_coefficients(self.as_tuple())

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (
            self.fixed_s,
            self.per_new_token_s,
            self.per_cached_token_s,
            self.per_attention_pair_s,
        )

    def predict_s(self, new_tokens: int, cached_tokens: int) -> float:
        return (
            self.fixed_s
            + self.per_new_token_s * new_tokens
            + self.per_cached_token_s * cached_tokens
            + self.per_attention_pair_s * attention_pairs(new_tokens, cached_tokens)
        )


@dataclass(frozen=True, slots=True)
class DecodeCoefficients:
    """``step_s(b, k) = fixed_s + per_sequence_s·b + per_context_token_s·k``; non-negative."""

    fixed_s: float
    per_sequence_s: float
    per_context_token_s: float

    def __post_init__(self) -> None:
        _check_coefficients(self.as_tuple())

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.fixed_s, self.per_sequence_s, self.per_context_token_s)

    def predict_s(self, batch_size: int, context_tokens: int) -> float:
        return (
            self.fixed_s
            + self.per_sequence_s * batch_size
            + self.per_context_token_s * context_tokens
        )


@dataclass(frozen=True, slots=True)
class TransferCoefficients:
    """``transfer_s(x) = latency_s + x / bytes_per_s``."""

    latency_s: float
    bytes_per_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0.0):
            raise ValueError(f"latency_s must be finite and >= 0, got {self.latency_s}")
        if not (math.isfinite(self.bytes_per_s) and self.bytes_per_s > 0.0):
            raise ValueError(f"bytes_per_s must be finite and > 0, got {self.bytes_per_s}")

    def predict_s(self, num_bytes: int) -> float:
        if num_bytes <= 0:
            return 0.0
        return self.latency_s + num_bytes / self.bytes_per_s


def _check_coefficients(values: Sequence[float]) -> None:
    for value in values:
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"coefficients must be finite and >= 0, got {tuple(values)}")


# -- priors ------------------------------------------------------------------------------------
# Used until a worker's profile has run. Orders of magnitude of a 7-8B model in bf16 on one
# H100-class GPU (docs/design/scheduling.md §2.4); deliberately on the slow side, so that an
# uncalibrated instance is not flooded and admission errs towards accepting less.

PRIOR_PREFILL: Final = PrefillCoefficients(
    fixed_s=0.010,
    per_new_token_s=1.0e-4,
    per_cached_token_s=2.0e-6,
    per_attention_pair_s=2.0e-9,
)
"""10 ms fixed, 10k new tokens/s, 0.5 M cached tokens/s attached, 2 ns per attention pair."""

PRIOR_DECODE: Final = DecodeCoefficients(
    fixed_s=0.010,
    per_sequence_s=1.0e-4,
    per_context_token_s=2.0e-8,
)
"""10 ms per step, +0.1 ms per sequence, +20 ms per million context tokens."""

PRIOR_TRANSFERS: Final[Mapping[Transport, TransferCoefficients]] = {
    Transport.SHM: TransferCoefficients(latency_s=20e-6, bytes_per_s=10e9),
    Transport.TCP: TransferCoefficients(latency_s=100e-6, bytes_per_s=3e9),
    Transport.RDMA: TransferCoefficients(latency_s=10e-6, bytes_per_s=20e9),
}
"""Shared memory ~ one-thread memcpy; TCP ~ loopback/25 GbE; RDMA ~ a 200 Gb/s NIC."""

PRIOR_SSD_READ: Final = TransferCoefficients(latency_s=100e-6, bytes_per_s=1.2e9)
"""Random 256 KiB reads from NVMe (../shared/notes/machine-limits.md: ~1.2 GB/s here)."""


# -- samples and fitting -----------------------------------------------------------------------


class PrefillSample(NamedTuple):
    new_tokens: int
    cached_tokens: int
    seconds: float


class DecodeSample(NamedTuple):
    batch_size: int
    context_tokens: int
    seconds: float


_Sample = TypeVar("_Sample", PrefillSample, DecodeSample)


def fit_nonnegative(features: FloatArray, targets: FloatArray) -> FloatArray:
    """Least squares ``min ||features·x - targets||`` subject to ``x >= 0``.

    Exact for the few features used here: the optimum is the unconstrained least-squares solution
    on its own support, so solving every subset of columns (2^p - 1 of them, p <= 4) and keeping
    the feasible one with the smallest residual finds it. Columns are scaled to unit norm first,
    since they differ by up to ten orders of magnitude (1 against n·c).
    """
    if features.ndim != 2 or targets.shape != (features.shape[0],):
        raise ValueError("features must be (m, p) and targets (m,)")
    num_features = features.shape[1]
    norms = np.linalg.norm(features, axis=0)
    norms[norms == 0.0] = 1.0
    scaled = features / norms
    best = np.zeros(num_features)
    best_residual = float(np.dot(targets, targets))
    for size in range(1, num_features + 1):
        for support in itertools.combinations(range(num_features), size):
            columns = list(support)
            solution, *_ = np.linalg.lstsq(scaled[:, columns], targets, rcond=None)
            if (solution < 0.0).any():
                continue
            residual_vector = scaled[:, columns] @ solution - targets
            residual = float(np.dot(residual_vector, residual_vector))
            if residual < best_residual - 1e-15 * best_residual:
                best_residual = residual
                best = np.zeros(num_features)
                best[columns] = solution
    fitted: FloatArray = best / norms
    return fitted


def _prefill_features(samples: Sequence[PrefillSample]) -> tuple[FloatArray, FloatArray]:
    raw = np.array([(s.new_tokens, s.cached_tokens, s.seconds) for s in samples], dtype=float)
    new, cached = raw[:, 0], raw[:, 1]
    features = np.column_stack(
        (np.ones(len(raw)), new, cached, new * cached + new * (new + 1.0) / 2.0)
    )
    return features, raw[:, 2]


def _decode_features(samples: Sequence[DecodeSample]) -> tuple[FloatArray, FloatArray]:
    raw = np.array([(s.batch_size, s.context_tokens, s.seconds) for s in samples], dtype=float)
    return np.column_stack((np.ones(len(raw)), raw[:, 0], raw[:, 1])), raw[:, 2]


def _validate_samples(samples: Sequence[NamedTuple], minimum: int, what: str) -> None:
    if len(samples) < minimum:
        raise ValueError(f"need at least {minimum} {what} samples to fit, got {len(samples)}")
    for sample in samples:
        *sizes, seconds = sample
        if any(size < 0 for size in sizes) or not (math.isfinite(seconds) and seconds > 0.0):
            raise ValueError(f"bad {what} sample {sample!r}: sizes >= 0 and seconds > 0 needed")


def _relative(features: FloatArray, targets: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Rows divided by their target: least squares then minimises the *relative* errors (what
    the MAPE metric measures), so short prefills weigh as much as long ones; with timing noise
    proportional to the time, this is also the best linear unbiased estimate."""
    weights = 1.0 / targets
    return features * weights[:, None], targets * weights


def fit_prefill(samples: Sequence[PrefillSample]) -> PrefillCoefficients:
    """Fit the prefill model (non-negative least squares; at least 4 samples)."""
    _validate_samples(samples, 4, "prefill")
    a0, a1, a2, a3 = fit_nonnegative(*_relative(*_prefill_features(samples))).tolist()
    return PrefillCoefficients(a0, a1, a2, a3)


def fit_decode(samples: Sequence[DecodeSample]) -> DecodeCoefficients:
    """Fit the decode-step model (non-negative least squares; at least 3 samples)."""
    _validate_samples(samples, 3, "decode")
    d0, d1, d2 = fit_nonnegative(*_relative(*_decode_features(samples))).tolist()
    return DecodeCoefficients(d0, d1, d2)


def _well_determined(features: FloatArray) -> bool:
    """True if every coefficient is pinned down: full column rank, condition number < 1e6."""
    if features.shape[0] < 2 * features.shape[1]:
        return False
    norms = np.linalg.norm(features, axis=0)
    if (norms == 0.0).any():
        return False
    singular = np.linalg.svd(features / norms, compute_uv=False)
    return bool(singular[-1] > 0.0 and singular[0] / singular[-1] < 1e6)


# -- profile plan ------------------------------------------------------------------------------

HANDOFF_DECODE_TOKENS: Final = 4
"""Tokens a profiled hand-off generates: its first chunk, then three steps to time."""


@dataclass(frozen=True, slots=True)
class ProfilePlan:
    """The points to time when a worker becomes ready (the registry runs them, then calls
    :meth:`LatencyPredictor.calibrate`).

    ``prefill_points``: ``(new_tokens, cached_tokens)``; run a prompt of ``cached + new`` tokens
    whose first ``cached`` tokens a previous request has just computed (so they are cached), and
    time the prefill (the worker's ``engine_time_s``). ``decode_points``: ``(batch_size,
    context_tokens)``; run ``batch_size`` sequences of ``context_tokens / batch_size`` tokens each
    and time the mean step. ``repeats``: how many times to time each point. ``handoff_points``:
    ``(new_tokens, cached_tokens)`` of a decode instance taking over a prefilled request: the
    pool holds whole blocks only, so it computes the last partial block plus the first token
    (``block_size/2 + 1`` tokens on average) after ``cached`` tokens (see
    :attr:`LatencyPredictor.handoff_s`).
    """

    prefill_points: tuple[tuple[int, int], ...]
    decode_points: tuple[tuple[int, int], ...]
    repeats: int = 2
    handoff_points: tuple[tuple[int, int], ...] = ()

    @classmethod
    def for_engine(cls, max_model_len: int, block_size: int, max_num_seqs: int) -> ProfilePlan:
        """A small grid spanning the engine's limits.

        Prefill: new tokens doubling from one block to half the context, plus one prompt filling
        the whole context; each with nothing cached, a quarter and half of the context cached,
        and as much as fits. The cached levels separate ``a2`` and the ``n·c`` part of ``a3``
        from the per-new-token terms; the long points give the ``n²`` curvature. Decode: batch
        sizes doubling from 1 to ``max_num_seqs``, each with one block, half the context and the
        whole context per sequence. Cached sizes are whole blocks (only those can hit).
        """
        if max_model_len < 4 or block_size < 1 or max_num_seqs < 1:
            raise ValueError("need max_model_len >= 4, block_size >= 1, max_num_seqs >= 1")
        limit = max_model_len - 1  # prompt tokens; at least one token is left to generate
        half = max_model_len // 2
        news: list[int] = []
        new = min(block_size, half)
        while new <= half:
            news.append(new)
            new *= 2
        news.append(max(limit - block_size, half))
        if len(news) < 3:  # blocks as large as the context: still three sizes for the curve
            news = [max(1, limit // 4), max(1, limit // 2), limit]

        def whole_blocks(tokens: int) -> int:
            return (tokens // block_size) * block_size

        prefill: set[tuple[int, int]] = set()
        for n in news:
            for c in (0, whole_blocks(max_model_len // 4), whole_blocks(half), limit - n):
                c = whole_blocks(c)
                if c >= 0 and n + c <= limit:
                    prefill.add((n, c))
        batches: list[int] = []
        batch = 1
        while batch < max_num_seqs:
            batches.append(batch)
            batch *= 2
        batches.append(max_num_seqs)
        per_sequence = (min(block_size, half), half, limit)
        decode = dict.fromkeys((b, b * s) for b in batches for s in per_sequence)
        tail = block_size // 2 + 1
        handoff = dict.fromkeys(
            (tail, c)
            for c in (block_size, whole_blocks(half))
            if c >= block_size and c + tail + HANDOFF_DECODE_TOKENS <= limit
        )
        return cls(tuple(sorted(prefill)), tuple(decode), handoff_points=tuple(handoff))


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
        self._ttft.append(_relative_error(predicted_s, observed_s))

    def observe_tpot(self, predicted_s: float, observed_s: float) -> None:
        self._tpot.append(_relative_error(predicted_s, observed_s))

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


def _relative_error(predicted_s: float, observed_s: float) -> float:
    if not (math.isfinite(predicted_s) and predicted_s >= 0.0):
        raise ValueError(f"predicted time must be finite and >= 0, got {predicted_s}")
    if not (math.isfinite(observed_s) and observed_s > 0.0):
        raise ValueError(f"observed time must be finite and > 0, got {observed_s}")
    return abs(predicted_s - observed_s) / observed_s


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


# -- the predictor -----------------------------------------------------------------------------


class LatencyPredictor:
    """The latency model of one instance: priors, then the profile fit, then online refits.

    Owned by the registry (one per instance); policies only call the ``*_s`` methods.
    """

    __slots__ = (
        "_accuracy",
        "_calibrated",
        "_decode",
        "_decode_fit",
        "_decode_profile",
        "_decode_since_fit",
        "_decode_window",
        "_handoff",
        "_prefill",
        "_prefill_fit",
        "_prefill_profile",
        "_prefill_since_fit",
        "_prefill_window",
        "_refit_every",
        "_ssd_read",
        "_transfers",
        "_ttft_overhead",
    )

    def __init__(
        self,
        prefill: PrefillCoefficients = PRIOR_PREFILL,
        decode: DecodeCoefficients = PRIOR_DECODE,
        transfers: Mapping[Transport, TransferCoefficients] = PRIOR_TRANSFERS,
        ssd_read: TransferCoefficients = PRIOR_SSD_READ,
        *,
        window: int = 256,
        refit_every: int = 32,
    ) -> None:
        if window < 8 or refit_every < 1:
            raise ValueError("need window >= 8 and refit_every >= 1")
        missing = set(Transport) - set(transfers)
        if missing:
            raise ValueError(f"no transfer model for {sorted(t.value for t in missing)}")
        self._prefill_fit = self._prefill = prefill
        self._decode_fit = self._decode = decode
        self._transfers = dict(transfers)
        self._ssd_read = ssd_read
        self._refit_every = refit_every
        self._prefill_profile: tuple[PrefillSample, ...] = ()
        self._decode_profile: tuple[DecodeSample, ...] = ()
        self._prefill_window: deque[PrefillSample] = deque(maxlen=window)
        self._decode_window: deque[DecodeSample] = deque(maxlen=window)
        self._prefill_since_fit = 0
        self._decode_since_fit = 0
        self._calibrated = False
        self._accuracy = PredictionAccuracy()
        self._ttft_overhead = RollingMedian(OVERHEAD_WINDOW, OVERHEAD_MIN_OBSERVATIONS)
        self._handoff = RollingMedian(OVERHEAD_WINDOW, OVERHEAD_MIN_OBSERVATIONS)

    # -- model state ---------------------------------------------------------------------------

    @property
    def prefill(self) -> PrefillCoefficients:
        """The prefill model in use: the fit with its fixed cost moved by the current level
        (:meth:`prefill_level_s`)."""
        return self._prefill

    @property
    def decode(self) -> DecodeCoefficients:
        """The decode-step model in use: the fit moved by the current level."""
        return self._decode

    @property
    def prefill_fit(self) -> PrefillCoefficients:
        """The last least-squares fit (profile, then refits), before the level correction."""
        return self._prefill_fit

    @property
    def decode_fit(self) -> DecodeCoefficients:
        return self._decode_fit

    def prefill_level_s(self) -> float:
        """Median of ``observed - fit`` over the last ``LEVEL_WINDOW`` observed prefills (0
        before ``LEVEL_MIN_OBSERVATIONS``): how far the engine runs from its fit right now."""
        return _level_s(self._prefill_window, self._prefill_fit.predict_s)

    def decode_level_s(self) -> float:
        """The same for decode steps."""
        return _level_s(self._decode_window, self._decode_fit.predict_s)

    def _apply_levels(self) -> None:
        fit = self._prefill_fit
        self._prefill = replace(fit, fixed_s=max(0.0, fit.fixed_s + self.prefill_level_s()))
        step = self._decode_fit
        self._decode = replace(step, fixed_s=max(0.0, step.fixed_s + self.decode_level_s()))

    @property
    def calibrated(self) -> bool:
        """True once a profile was fitted (until then the priors are used)."""
        return self._calibrated

    @property
    def accuracy(self) -> PredictionAccuracy:
        """This instance's rolling TTFT/TPOT error (the registry also keeps a cluster-wide one)."""
        return self._accuracy

    @property
    def ssd_read(self) -> TransferCoefficients:
        return self._ssd_read

    @property
    def num_prefill_observations(self) -> int:
        """Observed prefills in the refit window (the profile's samples not counted)."""
        return len(self._prefill_window)

    @property
    def num_decode_observations(self) -> int:
        return len(self._decode_window)

    @property
    def ttft_overhead_s(self) -> float:
        """What a TTFT on this instance (as its prefill instance) holds beyond the engine's
        time: the gateway's own work before and after the Prefill rpc and the rpc itself. The
        median of the last observations (observed TTFT minus the engine time the worker
        reported), the profile's rpc overhead until there are ``OVERHEAD_MIN_OBSERVATIONS``,
        0 before both."""
        return self._ttft_overhead.value

    @property
    def handoff_s(self) -> float:
        """What taking over a prefilled request costs this (decode) instance beyond one decode
        step: the Decode rpc, the connector's load, the last partial block recomputed (the pool
        holds whole blocks only). The median of the last observations (first chunk's wait
        minus its tokens' steps), the profile's measurement until there are
        ``OVERHEAD_MIN_OBSERVATIONS``, 0 before both."""
        return self._handoff.value

    def transfer(self, transport: Transport) -> TransferCoefficients:
        return self._transfers[transport]

    def set_transfer(self, transport: Transport, coefficients: TransferCoefficients) -> None:
        """Replace one transport's model (e.g. with a measured bandwidth)."""
        self._transfers[transport] = coefficients

    # -- predictions ---------------------------------------------------------------------------

    def prefill_s(self, new_tokens: int, cached_tokens: int) -> float:
        return self._prefill.predict_s(new_tokens, cached_tokens)

    def queue_s(self, queued_tokens: int, queued_requests: int) -> float:
        """Time to clear queued prefill work: ``r`` prompts of ``t/r`` uncached tokens each."""
        if queued_tokens <= 0:
            return 0.0
        requests = max(1, queued_requests)
        p = self._prefill
        return (
            p.fixed_s * requests
            + p.per_new_token_s * queued_tokens
            + p.per_attention_pair_s * queued_tokens * (queued_tokens / requests + 1.0) / 2.0
        )

    def decode_step_s(self, batch_size: int, context_tokens: int) -> float:
        return self._decode.predict_s(batch_size, context_tokens)

    def transfer_s(self, transport: Transport, num_bytes: int) -> float:
        """Handing a request prefilled elsewhere to this instance, ``num_bytes`` of KV away:
        :attr:`handoff_s` plus the bytes over ``transport``. The policy spreads it over the
        output's gaps (the first gap pays it; TPOT is their mean)."""
        return self._handoff.value + self._transfers[transport].predict_s(num_bytes)

    def load_s(self, transport: Transport, dram_bytes: int, ssd_bytes: int) -> float:
        """Time to bring cached KV in from the pool: DRAM bytes over ``transport``; SSD bytes are
        read from disk first, then sent the same way."""
        seconds = self._transfers[transport].predict_s(dram_bytes + ssd_bytes)
        if ssd_bytes > 0:
            seconds += self._ssd_read.predict_s(ssd_bytes)
        return seconds

    # -- calibration ---------------------------------------------------------------------------

    def calibrate(
        self,
        prefill: Sequence[PrefillSample],
        decode: Sequence[DecodeSample],
        *,
        ttft_overhead_s: float | None = None,
        handoff_s: float | None = None,
    ) -> None:
        """Fit both models to a profile's timings (see :class:`ProfilePlan`); the samples stay as
        anchors for online refits until the recent window can stand alone. ``ttft_overhead_s``
        and ``handoff_s``, when the profile measured them, stand until observations replace
        them."""
        self._prefill_fit = fit_prefill(prefill)
        self._decode_fit = fit_decode(decode)
        self._apply_levels()
        self._prefill_profile, self._decode_profile = tuple(prefill), tuple(decode)
        if ttft_overhead_s is not None:
            self._ttft_overhead.seed(ttft_overhead_s)
        if handoff_s is not None:
            self._handoff.seed(handoff_s)
        self._calibrated = True

    def adopt(self, sibling: LatencyPredictor) -> None:
        """Start from ``sibling``'s calibration: an instance of the same model on the same
        hardware runs at the same speed, so its profile beats the priors until this instance's
        own profile lands (which then replaces it through :meth:`calibrate`). Copies the fits,
        the profile anchors and the overheads' current values; not the sibling's recent
        observations (they describe its load, not this instance's)."""
        if not sibling.calibrated:
            raise ValueError("the sibling is not calibrated")
        self._prefill_fit, self._decode_fit = sibling._prefill_fit, sibling._decode_fit
        self._prefill_profile = sibling._prefill_profile
        self._decode_profile = sibling._decode_profile
        self._ttft_overhead.seed(sibling.ttft_overhead_s)
        self._handoff.seed(sibling.handoff_s)
        self._apply_levels()
        self._calibrated = True

    def observe_ttft_overhead(self, seconds: float) -> None:
        """One TTFT minus the engine time of its prefill on this instance (see
        :attr:`ttft_overhead_s`)."""
        self._ttft_overhead.add(seconds)

    def observe_handoff(self, seconds: float) -> None:
        """One take-over's first-chunk wait minus the steps of that chunk's tokens (see
        :attr:`handoff_s`); may be negative (noise), the estimate is clamped at 0."""
        self._handoff.add(seconds)

    def observe_prefill(self, new_tokens: int, cached_tokens: int, seconds: float) -> None:
        """One observed prefill (engine time, no queueing); refits every ``refit_every``."""
        sample = PrefillSample(new_tokens, cached_tokens, seconds)
        _validate_samples((sample,), 1, "prefill")
        self._prefill_window.append(sample)
        self._prefill_since_fit += 1
        if self._prefill_since_fit >= self._refit_every:
            self.refit()
        else:
            self._apply_levels()

    def observe_decode_step(self, batch_size: int, context_tokens: int, seconds: float) -> None:
        """One observed decode step (or a mean over several of the same shape)."""
        sample = DecodeSample(batch_size, context_tokens, seconds)
        _validate_samples((sample,), 1, "decode")
        self._decode_window.append(sample)
        self._decode_since_fit += 1
        if self._decode_since_fit >= self._refit_every:
            self.refit()
        else:
            self._apply_levels()

    def refit(self) -> None:
        """Refit both models from the recent windows (plus the profile anchors when the window
        is not full or cannot determine every coefficient alone). Keeps the current model when
        there is too little data."""
        prefill = _training_set(self._prefill_window, self._prefill_profile, _prefill_features)
        if len(prefill) >= 8:
            self._prefill_fit = fit_prefill(prefill)
        decode = _training_set(self._decode_window, self._decode_profile, _decode_features)
        if len(decode) >= 6:
            self._decode_fit = fit_decode(decode)
        self._prefill_since_fit = 0
        self._decode_since_fit = 0
        self._apply_levels()


def _level_s(window: deque[_Sample], predict_s: Callable[[int, int], float]) -> float:
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


def _training_set(
    window: deque[_Sample],
    profile: Iterable[_Sample],
    features: Callable[[Sequence[_Sample]], tuple[FloatArray, FloatArray]],
) -> list[_Sample]:
    recent = list(window)
    if recent and len(recent) == window.maxlen and _well_determined(features(recent)[0]):
        return recent
    training = list(profile)
    training.extend(recent)
    return training
