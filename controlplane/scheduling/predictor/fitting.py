"""Samples and the non-negative least-squares fits of the prefill and decode models."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from controlplane.scheduling.predictor.model import DecodeCoefficients, PrefillCoefficients

FloatArray = npt.NDArray[np.float64]


# -- samples and fitting -----------------------------------------------------------------------


class PrefillSample(NamedTuple):
    new_tokens: int
    cached_tokens: int
    seconds: float


class DecodeSample(NamedTuple):
    batch_size: int
    context_tokens: int
    seconds: float


Sample = TypeVar("Sample", PrefillSample, DecodeSample)


def fit_nonnegative(features: FloatArray, targets: FloatArray) -> FloatArray:
    """Least squares ``min ||features·x - targets||`` subject to ``x >= 0``.

    Exact for the few features used here: the optimum is the unconstrained least-squares solution
    on its own support, so solving every subset of columns (2^p - 1 of them, p <= 6: the
    simulator's step model has six terms) and keeping the feasible one with the smallest
    residual finds it. Columns are scaled to unit norm first,
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


def prefill_features(samples: Sequence[PrefillSample]) -> tuple[FloatArray, FloatArray]:
    raw = np.array([(s.new_tokens, s.cached_tokens, s.seconds) for s in samples], dtype=float)
    new, cached = raw[:, 0], raw[:, 1]
    features = np.column_stack(
        (np.ones(len(raw)), new, cached, new * cached + new * (new + 1.0) / 2.0)
    )
    return features, raw[:, 2]


def decode_features(samples: Sequence[DecodeSample]) -> tuple[FloatArray, FloatArray]:
    raw = np.array([(s.batch_size, s.context_tokens, s.seconds) for s in samples], dtype=float)
    return np.column_stack((np.ones(len(raw)), raw[:, 0], raw[:, 1])), raw[:, 2]


def validate_samples(samples: Sequence[NamedTuple], minimum: int, what: str) -> None:
    if len(samples) < minimum:
        raise ValueError(f"need at least {minimum} {what} samples to fit, got {len(samples)}")
    for sample in samples:
        *sizes, seconds = sample
        if any(size < 0 for size in sizes) or not (math.isfinite(seconds) and seconds > 0.0):
            raise ValueError(f"bad {what} sample {sample!r}: sizes >= 0 and seconds > 0 needed")


def relative(features: FloatArray, targets: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Rows divided by their target: least squares then minimises the *relative* errors (what
    the MAPE metric measures), so short prefills weigh as much as long ones; with timing noise
    proportional to the time, this is also the best linear unbiased estimate."""
    weights = 1.0 / targets
    return features * weights[:, None], targets * weights


def fit_prefill(samples: Sequence[PrefillSample]) -> PrefillCoefficients:
    """Fit the prefill model (non-negative least squares; at least 4 samples)."""
    validate_samples(samples, 4, "prefill")
    a0, a1, a2, a3 = fit_nonnegative(*relative(*prefill_features(samples))).tolist()
    return PrefillCoefficients(a0, a1, a2, a3)


def fit_decode(samples: Sequence[DecodeSample]) -> DecodeCoefficients:
    """Fit the decode-step model (non-negative least squares; at least 3 samples)."""
    validate_samples(samples, 3, "decode")
    d0, d1, d2 = fit_nonnegative(*relative(*decode_features(samples))).tolist()
    return DecodeCoefficients(d0, d1, d2)


def well_determined(features: FloatArray) -> bool:
    """True if every coefficient is pinned down: full column rank, condition number < 1e6."""
    if features.shape[0] < 2 * features.shape[1]:
        return False
    norms = np.linalg.norm(features, axis=0)
    if (norms == 0.0).any():
        return False
    singular = np.linalg.svd(features / norms, compute_uv=False)
    return bool(singular[-1] > 0.0 and singular[0] / singular[-1] < 1e6)
