"""An engine's timing profile: the step model of one engine step and its capacities.

A profile is a YAML file (``simulator/profiles/*.yaml``; their sources are cited in each file):
the six coefficients of :class:`StepModel` and the engine's KV size and limits. The same step
model is the engine model's ground truth (:mod:`simulator.engine`) and, through
:meth:`EngineProfile.calibration_samples`, what the scheduler's latency model is calibrated
with — as the real gateway's start-up profile times a real engine (docs/design/simulator.md §3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from controlplane.scheduling import (
    DecodeCoefficients,
    DecodeSample,
    PrefillCoefficients,
    PrefillSample,
    ProfilePlan,
)
from controlplane.scheduling.predictor.fitting import fit_nonnegative, relative, validate_samples

FloatArray = npt.NDArray[np.float64]

__all__ = [
    "EngineProfile",
    "StepFit",
    "StepModel",
    "attention_pairs",
    "fit_step_model",
    "fit_step_rows",
    "load_profile",
    "profile_yaml",
]


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


@dataclass(frozen=True, slots=True)
class StepFit:
    """A :class:`StepModel` fitted to measured points, with how well it reproduces them."""

    step: StepModel
    mape: float
    """Mean of ``|fitted / measured - 1|`` over the points."""
    max_error: float
    """Largest ``|fitted / measured - 1|``."""
    num_points: int


def fit_step_rows(features: FloatArray, targets: FloatArray) -> StepFit:
    """The step model whose ``features`` (one row per step: 1, P, C, A, D, K — the terms of
    :class:`StepModel`) reproduce ``targets`` (seconds) with the smallest relative errors, every
    coefficient >= 0."""
    if features.ndim != 2 or features.shape[1] != len(fields(StepModel)):
        raise ValueError(f"step features are rows of {len(fields(StepModel))} terms")
    solution = fit_nonnegative(*relative(features, targets))
    errors = np.abs(features @ solution / targets - 1.0)
    step = StepModel(*(float(v) for v in solution))
    return StepFit(step, float(errors.mean()), float(errors.max()), len(targets))


def fit_step_model(prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample]) -> StepFit:
    """The step model of measured prompts alone in a step (``prefill``: seconds of ``new``
    tokens after ``cached`` ones) and decode-only steps (``decode``: a batch's step at its total
    context), one fixed cost shared by both (:func:`fit_step_rows`). ValueError with too few
    points (4 prefill, 3 decode) or a bad one."""
    validate_samples(prefill, 4, "prefill")
    validate_samples(decode, 3, "decode")
    rows = [(1, n, c, attention_pairs(n, c), 0, 0, s) for n, c, s in prefill]
    rows += [(1, 0, 0, 0, b, k, s) for b, k, s in decode]
    table = np.array(rows, dtype=float)
    return fit_step_rows(table[:, :-1], table[:, -1])


def _number(value: float) -> str:
    return "0.0" if value == 0.0 else f"{value:.6g}"


def profile_yaml(
    profile: EngineProfile, fit: StepFit | None = None, extra: Sequence[str] = ()
) -> str:
    """A profile file's text (what :func:`load_profile` reads): the profile's fields, its
    ``source`` as a literal block, the fit's quality under ``fit:`` and ``extra`` lines (other
    top-level keys the reader ignores, e.g. the measured points) at the end."""
    source = "\n".join("  " + line for line in profile.source.strip().splitlines())
    lines = [
        f"name: {profile.name}",
        f"model: {profile.model}",
        f"hardware: {profile.hardware}",
        "source: |",
        source,
        f"kv_bytes_per_token: {profile.kv_bytes_per_token}",
        f"hbm_kv_tokens: {profile.hbm_kv_tokens}",
        f"max_num_seqs: {profile.max_num_seqs}",
        f"max_num_batched_tokens: {profile.max_num_batched_tokens}",
        f"max_model_len: {profile.max_model_len}",
        f"tensor_parallel: {profile.tensor_parallel}",
        "step:",
        *(f"  {f.name}: {_number(getattr(profile.step, f.name))}" for f in fields(StepModel)),
    ]
    if fit is not None:
        lines += [
            "fit:",
            f"  grid_points: {fit.num_points}",
            f"  mape: {fit.mape:.4f}",
            f"  max_error: {fit.max_error:.4f}",
        ]
    return "\n".join([*lines, *extra, ""])
