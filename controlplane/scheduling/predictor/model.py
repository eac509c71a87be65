"""The latency model's terms: the transports, the coefficient records of prefill, decode step
and transfer, and the priors used until a worker's profile has run (formulas: the package
docstring, controlplane/scheduling/predictor/__init__.py)."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

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
        check_coefficients(self.as_tuple())

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
        check_coefficients(self.as_tuple())

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


def check_coefficients(values: Sequence[float]) -> None:
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
