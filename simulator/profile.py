"""An engine's timing profile: the step model of one engine step and its capacities.

A profile is a YAML file (``simulator/profiles/*.yaml``; their sources are cited in each file):
the six coefficients of :class:`StepModel` and the engine's KV size and limits. The same step
model is the engine model's ground truth (:mod:`simulator.engine`) and, through
:meth:`EngineProfile.calibration_samples`, what the scheduler's latency model is calibrated
with — as the real gateway's start-up profile times a real engine (docs/design/simulator.md §3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from controlplane.scheduling import (
    DecodeCoefficients,
    DecodeSample,
    PrefillCoefficients,
    PrefillSample,
    ProfilePlan,
)

__all__ = ["EngineProfile", "StepModel", "attention_pairs", "load_profile"]


def attention_pairs(new_tokens: int, earlier_tokens: int) -> int:
    """Query-key pairs of causal attention for a chunk of ``new_tokens`` after
    ``earlier_tokens`` (integers: exact, unlike the predictor's float form)."""
    return new_tokens * earlier_tokens + new_tokens * (new_tokens + 1) // 2


@dataclass(frozen=True, slots=True)
class StepModel:
    """``step_s = fixed + a·P + c·C + p·A + s·D + k·K`` (docs/design/simulator.md §3): ``P``
    prompt tokens computed in the step, ``C`` earlier tokens those chunks attend to, ``A`` their
    attention pairs, ``D`` decoding sequences, ``K`` their context tokens."""

    fixed_s: float
    per_prefill_token_s: float
    per_cached_token_s: float
    per_attention_pair_s: float
    per_decode_sequence_s: float
    per_context_token_s: float

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0):
                raise ValueError(f"step.{f.name} must be a finite number >= 0, got {value!r}")
        if self.fixed_s + self.per_decode_sequence_s <= 0.0:
            raise ValueError("a step must take time: step.fixed_s + per_decode_sequence_s > 0")

    def step_s(
        self,
        prefill_tokens: int,
        earlier_tokens: int,
        pairs: int,
        decode_sequences: int,
        context_tokens: int,
    ) -> float:
        return (
            self.fixed_s
            + self.per_prefill_token_s * prefill_tokens
            + self.per_cached_token_s * earlier_tokens
            + self.per_attention_pair_s * pairs
            + self.per_decode_sequence_s * decode_sequences
            + self.per_context_token_s * context_tokens
        )

    def prefill_s(self, new_tokens: int, cached_tokens: int) -> float:
        """One prompt alone in a step."""
        pairs = attention_pairs(new_tokens, cached_tokens)
        return self.step_s(new_tokens, cached_tokens, pairs, 0, 0)

    def decode_step_s(self, batch_size: int, context_tokens: int) -> float:
        """A step of ``batch_size`` decoding sequences and nothing else."""
        return self.step_s(0, 0, 0, batch_size, context_tokens)

    def prefill_coefficients(self) -> PrefillCoefficients:
        """The scheduler's prefill model of this step model (exact for a prompt alone)."""
        return PrefillCoefficients(
            self.fixed_s,
            self.per_prefill_token_s,
            self.per_cached_token_s,
            self.per_attention_pair_s,
        )

    def decode_coefficients(self) -> DecodeCoefficients:
        return DecodeCoefficients(
            self.fixed_s, self.per_decode_sequence_s, self.per_context_token_s
        )


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """One engine (a model on a GPU or GPU group): its step model and capacities."""

    name: str
    model: str
    hardware: str
    source: str
    step: StepModel
    kv_bytes_per_token: int
    hbm_kv_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int = 32_768
    tensor_parallel: int = 1
    """GPUs one instance spans. ``kv_bytes_per_token`` is per GPU (what each GPU of the
    instance moves); ``hbm_kv_tokens`` is the instance's."""

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1:
            raise ValueError("tensor_parallel must be >= 1")
        for name in ("kv_bytes_per_token", "hbm_kv_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_num_batched_tokens < 1 or self.max_model_len < 2:
            raise ValueError("need max_num_batched_tokens >= 1 and max_model_len >= 2")

    def calibration_samples(
        self, block_size: int
    ) -> tuple[tuple[PrefillSample, ...], tuple[DecodeSample, ...]]:
        """What the gateway's start-up profile would measure on this engine: the points of
        :meth:`ProfilePlan.for_engine`, timed by the step model."""
        plan = ProfilePlan.for_engine(self.max_model_len, block_size, self.max_num_seqs)
        prefill = tuple(
            PrefillSample(new, cached, self.step.prefill_s(new, cached))
            for new, cached in plan.prefill_points
        )
        decode = tuple(
            DecodeSample(batch, context, self.step.decode_step_s(batch, context))
            for batch, context in plan.decode_points
        )
        return prefill, decode


def profile_from_mapping(data: Mapping[str, Any], origin: str) -> EngineProfile:
    """An :class:`EngineProfile` from a profile file's mapping; ValueError naming ``origin``
    and the field on anything missing or wrong."""
    try:
        step = data["step"]
        if not isinstance(step, Mapping):
            raise ValueError("step must be a mapping")
        unknown = set(step) - {f.name for f in fields(StepModel)}
        if unknown:
            raise ValueError(f"unknown step coefficients {sorted(unknown)}")
        return EngineProfile(
            name=str(data["name"]),
            model=str(data["model"]),
            hardware=str(data["hardware"]),
            source=str(data.get("source", "")),
            step=StepModel(**{k: float(v) for k, v in step.items()}),
            kv_bytes_per_token=int(data["kv_bytes_per_token"]),
            hbm_kv_tokens=int(data["hbm_kv_tokens"]),
            max_num_seqs=int(data["max_num_seqs"]),
            max_num_batched_tokens=int(data["max_num_batched_tokens"]),
            max_model_len=int(data.get("max_model_len", 32_768)),
            tensor_parallel=int(data.get("tensor_parallel", 1)),
        )
    except KeyError as exc:
        raise ValueError(f"{origin}: missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{origin}: {exc}") from None


def read_mapping(path: Path, what: str) -> Mapping[str, Any]:
    """A YAML file holding one mapping (a profile, a config); ValueError with the path."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the {what}: {exc}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: a {what} is a mapping")
    return data


def load_profile(path: Path) -> EngineProfile:
    """Read a profile file (ValueError with the path on a bad one)."""
    return profile_from_mapping(read_mapping(path, "profile"), str(path))
