"""Derive the simulator's engine-step profiles from published per-operation GPU timings.

Source: Microsoft's Vidur simulator (Agrawal et al., "Vidur: A Large-Scale Simulation Framework
for LLM Inference", MLSys 2024; https://github.com/microsoft/vidur). Vidur publishes measured
per-operation times (CUDA kernels timed one at a time, milliseconds per layer, median of
repetitions) of the transformer layer's operations, the attention kernels and the tensor-parallel
all-reduce. Its execution-time model composes one engine step from them: per layer the sum of the
operations at the step's token count (projections, RoPE, norms, MLP, residual add), plus the
attention prefill and decode kernels of the batch, plus two all-reduces under tensor parallelism,
times the number of layers. This script recomposes that model (not Vidur's code) on a grid of
batches and fits Strata's six-coefficient step model to it by non-negative least squares.

Inputs:

* ``--vidur PATH``: a local copy of the Vidur repository (a work tree, or a bare git directory
  such as the one the ``fetch`` tool gives; its ``HEAD`` is read). From it: the per-operation
  tables ``data/profiling/compute/{a100,h100}/meta-llama/<model>/mlp.csv`` and the all-reduce
  tables ``data/profiling/network/{a100,h100}_dgx/all_reduce.csv``.
* The attention-kernel tables are too large for that snapshot (about 10 MB each, not in it), so
  the rows this derivation uses were transcribed from the published files into
  :data:`ATTENTION_SAMPLES` below, with their provenance.

No network access. ``python simulator/profiles/derive_published.py --vidur PATH`` rewrites the
YAML profiles next to this file; ``--dry-run`` prints them instead.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Final

import numpy as np

import simulator.profile
from controlplane.scheduling.predictor.fitting import fit_nonnegative, relative
from simulator.profile import EngineProfile, FloatArray, StepFit, fit_step_rows

VIDUR_REPO: Final = "https://github.com/microsoft/vidur"

# -- Vidur's execution-time model constants (vidur/config/config.py defaults) -----------------
DECODE_BATCHING_OVERHEAD: Final = 0.1
"""``attention_decode_batching_overhead_fraction``: decode kernel x1.1 when batch > 1."""
PREFILL_BATCHING_OVERHEAD: Final = 0.1
"""``attention_prefill_batching_overhead_fraction``: prefill kernel x1.1 for > 1 prompt."""
NCCL_LAUNCH_MS: Final = 0.02
"""``nccl_cpu_launch_overhead_ms``, added to every all-reduce."""
KV_GRANULARITY: Final = 64
"""``kv_cache_prediction_granularity``: context lengths are rounded up to a multiple of 64."""
TOKEN_ROUNDING: Final = 8
"""The batch's token count is rounded up to a multiple of 8 for the per-token operations."""

LINEAR_OPS: Final = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
"""The per-token operations of one layer in ``mlp.csv`` that Vidur adds up (``emb``, the
embedding lookup, is profiled but not counted by Vidur's model)."""

# -- transcribed attention-kernel rows ---------------------------------------------------------


@dataclass(frozen=True)
class AttentionSamples:
    """Rows of one published attention table: per layer, per GPU, milliseconds (median).

    ``decode``: (batch size, context tokens per sequence, ms); ``prefill``: (chunk tokens,
    tokens already in KV, ms), one prompt."""

    gpu: str
    q_heads_per_gpu: int
    kv_heads_per_gpu: int
    source: str
    decode: tuple[tuple[int, int, float], ...]
    prefill: tuple[tuple[int, int, float], ...]


# fmt: off
ATTENTION_SAMPLES: Final = {
    "a100-llama2-7b-tp1": AttentionSamples(
        gpu="a100",
        q_heads_per_gpu=32,
        kv_heads_per_gpu=32,
        source=(
            "Vidur's data/profiling/compute/a100/meta-llama/Llama-2-7b-hf/attention.csv "
            "(FLASH_ATTENTION backend, block 16, tensor parallel 1, max_model_len 4096; "
            "10,680,357 bytes; read from the copy in github.com/sw5sh/cs378-assignment3 @ "
            "7ac2fe9fb6cea9d4630659a10c5cccfc9fbdd776, a Vidur fork whose LFS pointer in "
            "github.com/Nisarg-M-Patel/llm-fair-scheduling gives the same size)"
        ),
        decode=(
            (1, 32, 0.009), (2, 32, 0.009), (4, 32, 0.012), (8, 32, 0.018), (16, 32, 0.028),
            (24, 32, 0.038), (32, 32, 0.048), (48, 32, 0.073), (64, 32, 0.097), (80, 32, 0.120),
            (16, 992, 0.176), (24, 992, 0.241), (32, 992, 0.307), (40, 992, 0.370),
            (48, 992, 0.446), (56, 992, 0.506), (64, 992, 0.583), (72, 992, 0.643),
            (80, 992, 0.707), (88, 992, 0.774), (96, 992, 0.825),
            (56, 3072, 1.590), (64, 3072, 1.775), (72, 3072, 1.948), (80, 3072, 2.148),
            (88, 3072, 2.366), (96, 3072, 2.523), (104, 3072, 2.699), (112, 3072, 2.875),
            (120, 3072, 3.044), (128, 3072, 3.220),
            (1, 3136, 0.045), (2, 3136, 0.076), (4, 3136, 0.154), (6, 3136, 0.189),
            (8, 3136, 0.318), (10, 3136, 0.326),
        ),
        prefill=(
            (160, 2624, 0.103), (160, 3072, 0.116), (160, 3584, 0.129), (160, 3904, 0.134),
            (192, 0, 0.027), (192, 256, 0.037), (192, 512, 0.049), (192, 1024, 0.066),
            (192, 1536, 0.080), (192, 2048, 0.091), (192, 2560, 0.104), (192, 3072, 0.117),
            (512, 832, 0.162), (512, 1024, 0.175), (512, 1536, 0.223), (512, 2048, 0.252),
            (512, 2560, 0.295), (512, 3072, 0.321), (512, 3584, 0.362),
            (544, 0, 0.125), (544, 256, 0.140), (544, 512, 0.160), (544, 768, 0.173),
            (544, 960, 0.202),
            (1408, 544, 0.515), (1408, 1024, 0.565), (1408, 1536, 0.647), (1408, 2048, 0.728),
            (1408, 2688, 0.834),
            (1472, 0, 0.460), (1472, 256, 0.508), (1472, 512, 0.541), (1472, 768, 0.586),
            (1472, 1024, 0.624), (1472, 1280, 0.661),
            (2816, 384, 1.471), (2816, 640, 1.565), (2816, 1024, 1.653), (2816, 1280, 1.735),
            (2880, 0, 1.439), (2880, 256, 1.509), (2880, 512, 1.615), (2880, 768, 1.682),
            (2880, 1024, 1.758), (2880, 1216, 1.805),
            (2944, 0, 1.488), (2944, 256, 1.563), (2944, 448, 1.641),
        ),
    ),
    "a100-llama2-70b-tp2": AttentionSamples(
        gpu="a100",
        q_heads_per_gpu=32,
        kv_heads_per_gpu=4,
        source=(
            "Vidur's data/profiling/a100/attention.csv (pre-May-2024 layout, removed by "
            "commit bee57da; the version at microsoft/vidur@"
            "e2d00e9afba96cec9f0e7ea560bbfc4a539fae6a; n_embd 8192, 64 q / 8 kv heads = "
            "Llama-2-70B, tensor parallel 2, FLASH_ATTENTION, Kineto timing, "
            "max_model_len 4096)"
        ),
        decode=(
            (1, 32, 0.015), (2, 32, 0.014), (4, 32, 0.013), (8, 32, 0.012), (16, 32, 0.016),
            (32, 32, 0.012), (48, 32, 0.012), (64, 32, 0.018), (80, 32, 0.020),
            (123, 1408, 0.249), (128, 1408, 0.251),
            (1, 1472, 0.018), (2, 1472, 0.020), (4, 1472, 0.028), (8, 1472, 0.043),
            (16, 1472, 0.068), (24, 1472, 0.057), (32, 1472, 0.082), (40, 1472, 0.086),
            (48, 1472, 0.096), (56, 1472, 0.139), (64, 1472, 0.160), (72, 1472, 0.163),
            (101, 3072, 0.365), (104, 3072, 0.376), (108, 3072, 0.391), (112, 3072, 0.491),
            (120, 3072, 0.499), (128, 3072, 0.511),
            (1, 3136, 0.017), (2, 3136, 0.019), (4, 3136, 0.028), (8, 3136, 0.053),
            (16, 3136, 0.081), (24, 3136, 0.104), (32, 3136, 0.155), (40, 3136, 0.162),
            (48, 3136, 0.184),
        ),
        prefill=(
            (416, 2944, 0.239), (416, 3328, 0.265), (416, 3648, 0.278),
            (448, 0, 0.064), (448, 256, 0.077), (448, 512, 0.092), (448, 1024, 0.124),
            (448, 1536, 0.154), (448, 2048, 0.184), (448, 2496, 0.210), (448, 2752, 0.225),
            (1216, 2880, 0.610),
            (1280, 0, 0.315), (1280, 256, 0.341), (1280, 512, 0.370), (1280, 1024, 0.431),
            (1280, 1536, 0.492), (1280, 2048, 0.546), (1280, 2560, 0.608), (1280, 2816, 0.636),
            (1344, 0, 0.342), (1344, 256, 0.367), (1344, 352, 0.410),
            (3776, 288, 2.144), (3776, 320, 2.110),
            (3840, 0, 2.045), (3840, 128, 2.095), (3840, 256, 2.111),
            (3904, 0, 2.128), (3904, 192, 2.204),
            (3968, 0, 2.178), (3968, 128, 2.219),
            (4032, 0, 2.248), (4032, 64, 2.320),
            (4096, 0, 2.314),
        ),
    ),
}
# fmt: on
"""Transcribed rows (``time_stats.attn_decode.median`` / ``time_stats.attn_prefill.median``) of
the two published A100 attention tables this derivation uses. No H100 attention table was
available (Vidur's are not in the snapshot and no copy of them was found), see
:func:`attention_model`."""

# -- models and profiles ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    hf_name: str
    vidur_dir: str
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    parameters: float
    max_model_len: int


# fmt: off
LLAMA2_7B: Final = ModelSpec(
    "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf",
    32, 4096, 32, 32, 128, 11008, 32000, 6.738e9, 4096,
)
LLAMA2_70B: Final = ModelSpec(
    "meta-llama/Llama-2-70b-hf", "meta-llama/Llama-2-70b-hf",
    80, 8192, 64, 8, 128, 28672, 32000, 68.977e9, 4096,
)
# fmt: on

GIB: Final = 1024**3
MIB: Final = 1024**2


@dataclass(frozen=True)
class ProfileSpec:
    name: str
    model: ModelSpec
    gpu: str
    tp: int
    hardware: str
    hbm_bytes_per_gpu: float
    """Total device memory as the driver reports it (nvidia-smi)."""
    attention: str
    """Key of :data:`ATTENTION_SAMPLES` whose kernels are used (transferred if need be)."""
    activation_reserve_bytes: float
    notes: tuple[str, ...] = field(default=())


A100_HBM: Final = 81920 * MIB  # A100-SXM4-80GB: 81920 MiB
H100_HBM: Final = 81559 * MIB  # H100 80GB HBM3 (SXM): 81559 MiB

# fmt: off
PROFILES: Final = (
    ProfileSpec(
        "llama2-7b-a100", LLAMA2_7B, "a100", 1,
        "1x NVIDIA A100 80GB (SXM), tensor parallel 1",
        A100_HBM, "a100-llama2-7b-tp1", 2 * GIB,
    ),
    ProfileSpec(
        "llama2-7b-h100", LLAMA2_7B, "h100", 1,
        "1x NVIDIA H100 80GB (SXM), tensor parallel 1",
        H100_HBM, "a100-llama2-7b-tp1", 2 * GIB,
    ),
    ProfileSpec(
        "llama2-70b-tp4-a100", LLAMA2_70B, "a100", 4,
        "4x NVIDIA A100 80GB (SXM, NVLink, DGX A100), tensor parallel 4",
        A100_HBM, "a100-llama2-70b-tp2", 3 * GIB,
    ),
    ProfileSpec(
        "llama2-70b-tp4-h100", LLAMA2_70B, "h100", 4,
        "4x NVIDIA H100 80GB (SXM, NVLink, DGX H100), tensor parallel 4",
        H100_HBM, "a100-llama2-70b-tp2", 3 * GIB,
    ),
)
# fmt: on

MAX_NUM_SEQS: Final = 256
MAX_NUM_BATCHED_TOKENS: Final = 8192
GPU_MEMORY_UTILIZATION: Final = 0.9

# -- reading Vidur's tables --------------------------------------------------------------------


class VidurData:
    """Files of a local Vidur copy: a work tree, or a bare git directory (its HEAD)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.worktree = (root / "data" / "profiling").is_dir()

    def read(self, relative: str) -> str:
        if self.worktree:
            return (self.root / relative).read_text()
        done = subprocess.run(
            ["git", f"--git-dir={self.root}", "show", f"HEAD:{relative}"],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    def commit(self) -> str:
        args = ["git", "-C", str(self.root)] if self.worktree else ["git", f"--git-dir={self.root}"]
        done = subprocess.run([*args, "rev-parse", "HEAD"], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "unknown"

    def rows(self, relative: str) -> list[dict[str, str]]:
        return list(csv.DictReader(io.StringIO(self.read(relative))))


@dataclass(frozen=True)
class Curve:
    """Piecewise-linear time (ms) against a token count, extrapolated past the last point with
    the slope of a least-squares line through its last quarter."""

    x: FloatArray
    y: FloatArray
    tail_slope: float

    @staticmethod
    def of(points: Iterable[tuple[float, float]]) -> Curve:
        pairs = sorted(points)
        x = np.array([p[0] for p in pairs], dtype=np.float64)
        y = np.array([p[1] for p in pairs], dtype=np.float64)
        tail = max(2, len(x) // 4)
        slope = float(np.polyfit(x[-tail:], y[-tail:], 1)[0])
        return Curve(x, y, max(slope, 0.0))

    def __call__(self, at: float) -> float:
        if at <= self.x[-1]:
            return float(np.interp(at, self.x, self.y))
        return float(self.y[-1] + self.tail_slope * (at - self.x[-1]))


def _median_by(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    grouped: dict[float, list[float]] = {}
    for key, value in points:
        grouped.setdefault(key, []).append(value)
    return [(key, float(np.median(values))) for key, values in grouped.items()]


def linear_op_curves(data: VidurData, gpu: str, model: ModelSpec, tp: int) -> dict[str, Curve]:
    """Median ms per layer of each per-token operation against the step's token count."""
    rel = f"data/profiling/compute/{gpu}/{model.vidur_dir}/mlp.csv"
    rows = [r for r in data.rows(rel) if int(r["num_tensor_parallel_workers"]) == tp]
    if not rows:
        raise ValueError(f"{rel}: no rows for tensor parallel {tp}")
    curves = {}
    for op in LINEAR_OPS:
        column = f"time_stats.{op}.median"
        points = ((float(r["num_tokens"]), float(r[column] or 0.0)) for r in rows)
        curves[op] = Curve.of(_median_by(points))
    return curves


def all_reduce_curve(data: VidurData, gpu: str, model: ModelSpec, tp: int) -> Curve:
    """Median ms of one all-reduce of the hidden states against the token count (bf16), smoothed
    by a running median over 9 neighbouring sizes (the small sizes are noisy, bimodal)."""
    rel = f"data/profiling/network/{gpu}_dgx/all_reduce.csv"
    rows = [
        r
        for r in data.rows(rel)
        if int(r["num_workers"]) == tp
        and int(r["devices_per_node"]) == tp
        and r["collective"] == "all_reduce"
    ]
    if not rows:
        raise ValueError(f"{rel}: no all_reduce rows for {tp} workers on one node")
    points = sorted(
        _median_by(
            (float(r["size"]) / (2 * model.hidden), float(r["time_stats.all_reduce.median"]))
            for r in rows
        )
    )
    values = [v for _, v in points]
    smooth = [float(np.median(values[max(0, i - 4) : i + 5])) for i in range(len(values))]
    return Curve.of(zip([x for x, _ in points], smooth, strict=True))


# -- the attention kernels -----------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionModel:
    """Per-layer attention kernel times (ms), fitted to the published rows.

    decode(b, k) = d0 + d1·b + d2·b·k   (k = context per sequence)
    prefill(n, c) = p0 + p1·n + p2·n·c + p3·n²"""

    decode_coef: tuple[float, float, float]
    prefill_coef: tuple[float, float, float, float]
    decode_mape: float
    prefill_mape: float

    def decode(self, batch: float, context: float) -> float:
        d0, d1, d2 = self.decode_coef
        return d0 + d1 * batch + d2 * batch * context

    def prefill(self, new: float, cached: float) -> float:
        p0, p1, p2, p3 = self.prefill_coef
        return p0 + p1 * new + p2 * new * cached + p3 * new * new


def fit_attention(samples: AttentionSamples) -> AttentionModel:
    dec = np.array(samples.decode, dtype=np.float64)
    dec_x = np.column_stack([np.ones(len(dec)), dec[:, 0], dec[:, 0] * dec[:, 1]])
    d = fit_nonnegative(*relative(dec_x, dec[:, 2]))
    pre = np.array(samples.prefill, dtype=np.float64)
    pre_x = np.column_stack([np.ones(len(pre)), pre[:, 0], pre[:, 0] * pre[:, 1], pre[:, 0] ** 2])
    p = fit_nonnegative(*relative(pre_x, pre[:, 2]))
    return AttentionModel(
        (float(d[0]), float(d[1]), float(d[2])),
        (float(p[0]), float(p[1]), float(p[2]), float(p[3])),
        float(np.mean(np.abs(dec_x @ d / dec[:, 2] - 1.0))),
        float(np.mean(np.abs(pre_x @ p / pre[:, 2] - 1.0))),
    )


@dataclass(frozen=True)
class Transfer:
    """How a profile's attention kernels were obtained from a measured table."""

    head_q: float
    head_kv: float
    memory_speedup: float
    compute_speedup: float


def attention_model(base: AttentionModel, transfer: Transfer) -> AttentionModel:
    """Scale a fitted kernel model to other heads per GPU and another GPU: the decode terms that
    read the KV cache with the KV heads and the memory speed-up, the prefill terms with the
    query heads and the compute speed-up; the constant (launch) terms are kept."""
    d0, d1, d2 = base.decode_coef
    p0, p1, p2, p3 = base.prefill_coef
    mem = transfer.memory_speedup
    comp = transfer.compute_speedup
    return AttentionModel(
        (d0, d1 * transfer.head_q / mem, d2 * transfer.head_kv / mem),
        (
            p0,
            p1 * transfer.head_q / comp,
            p2 * transfer.head_q / comp,
            p3 * transfer.head_q / comp,
        ),
        base.decode_mape,
        base.prefill_mape,
    )


# -- one engine step, composed as Vidur composes it ---------------------------------------------


@dataclass(frozen=True)
class Step:
    prefills: tuple[tuple[int, int], ...]
    """(chunk tokens, tokens already in KV) per prompt chunk."""
    decodes: tuple[int, ...]
    """Context tokens of each decoding sequence."""

    def features(self) -> tuple[float, float, float, float, float, float]:
        p = sum(n for n, _ in self.prefills)
        c = sum(c for _, c in self.prefills)
        a = sum(n * c + n * (n + 1) // 2 for n, c in self.prefills)
        return (
            1.0,
            float(p),
            float(c),
            float(a),
            float(len(self.decodes)),
            float(sum(self.decodes)),
        )


def _round_up(value: float, unit: int) -> int:
    return int(math.ceil(value / unit) * unit)


@dataclass(frozen=True)
class Composer:
    model: ModelSpec
    tp: int
    linear: dict[str, Curve]
    attention: AttentionModel
    all_reduce: Curve | None

    def lm_head_ms(self, sequences: int) -> float:
        """Not profiled by Vidur: the logits GEMM over one token per sequence, estimated as the
        measured gate/up projection at that token count scaled by vocab / (2 · intermediate)
        (both are [tokens x hidden] x [hidden x width/TP] GEMMs)."""
        if sequences == 0:
            return 0.0
        ratio = self.model.vocab / (2 * self.model.intermediate)
        return self.linear["mlp_up_proj"](_round_up(sequences, TOKEN_ROUNDING)) * ratio

    def step_ms(self, step: Step) -> float:
        tokens = sum(n for n, _ in step.prefills) + len(step.decodes)
        rounded = _round_up(tokens, TOKEN_ROUNDING)
        layer = sum(curve(rounded) for curve in self.linear.values())
        if step.prefills:
            kv = sum(_round_up(c, KV_GRANULARITY) for _, c in step.prefills)
            chunk = round(math.sqrt(sum(n * n for n, _ in step.prefills)))
            factor = 1.0 + PREFILL_BATCHING_OVERHEAD * (len(step.prefills) > 1)
            layer += self.attention.prefill(chunk, kv) * factor
        if step.decodes:
            batch = len(step.decodes)
            context = _round_up(int(np.mean(step.decodes)), KV_GRANULARITY)
            factor = 1.0 + DECODE_BATCHING_OVERHEAD * (batch > 1)
            layer += self.attention.decode(batch, context) * factor
        if self.all_reduce is not None:
            layer += 2 * (self.all_reduce(rounded) + NCCL_LAUNCH_MS)
        sequences = len(step.prefills) + len(step.decodes)
        return layer * self.model.layers + self.lm_head_ms(sequences)


# -- the grid and the fit --------------------------------------------------------------------


def grid(kv_capacity: int) -> list[Step]:
    """Prefill-only (one to four prompts, 128-8192 new tokens, 0-16k earlier tokens),
    decode-only (batch 1-256, 128-16k context each) and mixed steps; at most
    ``MAX_NUM_BATCHED_TOKENS`` tokens and what fits in ``kv_capacity``."""
    steps: list[Step] = []
    for n in (128, 256, 512, 1024, 2048, 4096, 8192):
        for c in (0, 512, 2048, 4096, 8192, 16384):
            steps.append(Step(((n, c),), ()))
    for k in (2, 4):
        for n in (256, 1024, 2048):
            for c in (0, 2048):
                if k * n <= MAX_NUM_BATCHED_TOKENS:
                    steps.append(Step(tuple((n, c) for _ in range(k)), ()))
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for ctx in (128, 512, 1024, 2048, 4096, 8192, 16384):
            steps.append(Step((), tuple(ctx for _ in range(b))))
    for b in (8, 32, 128):
        for ctx in (1024, 4096):
            for n, c in ((512, 0), (2048, 0), (512, 4096), (2048, 4096)):
                steps.append(Step(((n, c),), tuple(ctx for _ in range(b))))
    return [
        s
        for s in steps
        if sum(n for n, _ in s.prefills) + len(s.decodes) <= MAX_NUM_BATCHED_TOKENS
        and sum(n + c for n, c in s.prefills) + sum(s.decodes) <= kv_capacity
    ]


def fit_steps(composer: Composer, steps: Sequence[Step]) -> StepFit:
    x = np.array([s.features() for s in steps], dtype=np.float64)
    y = np.array([composer.step_ms(s) / 1e3 for s in steps], dtype=np.float64)
    return fit_step_rows(x, y)


# -- profile assembly --------------------------------------------------------------------------


def kv_bytes_per_token(model: ModelSpec, tp: int) -> int:
    """bf16 K and V of every layer for one token, on one GPU (KV heads split by TP)."""
    return model.layers * 2 * (model.kv_heads // tp) * model.head_dim * 2


def hbm_kv_tokens(spec: ProfileSpec) -> int:
    weights = spec.model.parameters * 2 / spec.tp
    free = GPU_MEMORY_UTILIZATION * spec.hbm_bytes_per_gpu - weights
    free -= spec.activation_reserve_bytes
    return int(free // kv_bytes_per_token(spec.model, spec.tp))


def speedups(data: VidurData, model: ModelSpec, tp: int) -> tuple[float, float]:
    """H100 over A100 for the same operations in Vidur's tables: memory-bound (the layer's
    per-token operations at 1-16 tokens, weight reads) and compute-bound (at 4096 tokens)."""
    a100 = linear_op_curves(data, "a100", model, tp)
    h100 = linear_op_curves(data, "h100", model, tp)

    def layer(curves: dict[str, Curve], tokens: float) -> float:
        return sum(curve(tokens) for curve in curves.values())

    small = (1, 2, 4, 8, 16)
    memory = float(np.mean([layer(a100, t) / layer(h100, t) for t in small]))
    compute = layer(a100, 4096) / layer(h100, 4096)
    return memory, compute


@dataclass(frozen=True)
class Derived:
    spec: ProfileSpec
    fit: StepFit
    attention: AttentionModel
    transfer: Transfer
    kv_tokens: int
    checks: dict[str, float]


def derive(data: VidurData, spec: ProfileSpec) -> Derived:
    samples = ATTENTION_SAMPLES[spec.attention]
    base = fit_attention(samples)
    mem, comp = (1.0, 1.0) if spec.gpu == samples.gpu else speedups(data, spec.model, spec.tp)
    transfer = Transfer(
        head_q=(spec.model.q_heads // spec.tp) / samples.q_heads_per_gpu,
        head_kv=(spec.model.kv_heads // spec.tp) / samples.kv_heads_per_gpu,
        memory_speedup=mem,
        compute_speedup=comp,
    )
    attention = attention_model(base, transfer)
    linear = linear_op_curves(data, spec.gpu, spec.model, spec.tp)
    reduce = all_reduce_curve(data, spec.gpu, spec.model, spec.tp) if spec.tp > 1 else None
    composer = Composer(spec.model, spec.tp, linear, attention, reduce)
    kv_tokens = hbm_kv_tokens(spec)
    fit = fit_steps(composer, grid(kv_tokens))
    checks = {
        "decode_b1_ctx1024_ms": composer.step_ms(Step((), (1024,))),
        "decode_b64_ctx2048_ms": composer.step_ms(Step((), tuple(2048 for _ in range(64)))),
        "prefill_2048_ms": composer.step_ms(Step(((2048, 0),), ())),
        "prefill_8192_ms": composer.step_ms(Step(((8192, 0),), ())),
    }
    return Derived(spec, fit, attention, transfer, kv_tokens, checks)


def _g(value: float) -> str:
    return "0.0" if value == 0.0 else f"{value:.6g}"


def _wrap(paragraphs: Iterable[str], width: int = 96) -> str:
    return "\n".join(textwrap.fill(p, width=width, break_on_hyphens=False) for p in paragraphs)


def source_text(d: Derived, vidur_commit: str) -> str:
    spec = d.spec
    samples = ATTENTION_SAMPLES[spec.attention]
    model = spec.model
    t = d.transfer
    paragraphs = [
        "Derived from Vidur's published per-operation GPU timings (Agrawal et al., 'Vidur: A"
        " Large-Scale Simulation Framework for LLM Inference', MLSys 2024),"
        f" {VIDUR_REPO} @ {vidur_commit}.",
        f"Per-token operations: data/profiling/compute/{spec.gpu}/{model.vidur_dir}/mlp.csv,"
        f" tensor parallel {spec.tp}, median ms per layer of input_layernorm, attn_pre_proj,"
        " attn_rope, attn_post_proj, post_attention_layernorm, mlp_up_proj, mlp_act,"
        " mlp_down_proj, add; interpolated in the token count, linear past the profiled 4096.",
    ]
    if spec.tp > 1:
        paragraphs.append(
            f"All-reduce: data/profiling/network/{spec.gpu}_dgx/all_reduce.csv ({spec.tp} GPUs"
            " of one node; running median over 9 sizes), two per layer plus Vidur's 0.02 ms"
            " NCCL launch overhead each."
        )
    paragraphs.append(
        f"Attention kernels: {samples.source}. The rows used are transcribed in"
        " simulator/profiles/derive_published.py and fitted per layer as decode = d0 + d1*b +"
        " d2*b*k, prefill = p0 + p1*n + p2*n*c + p3*n^2 (relative-error NNLS; MAPE on the rows"
        f" {d.attention.decode_mape:.1%} decode, {d.attention.prefill_mape:.1%} prefill)."
        " Measured contexts reach 4096 tokens; longer ones extrapolate these forms."
    )
    if t.head_q != 1.0 or t.head_kv != 1.0:
        paragraphs.append(
            f"ASSUMED transfer from {samples.q_heads_per_gpu} q / {samples.kv_heads_per_gpu} kv"
            f" heads per GPU to {model.q_heads // spec.tp} q / {model.kv_heads // spec.tp} kv"
            " (no tensor-parallel-4 attention rows were available): the prefill terms and d1"
            " scaled by the q-head ratio, d2 (the KV read) by the kv-head ratio."
        )
    if t.memory_speedup != 1.0 or t.compute_speedup != 1.0:
        paragraphs.append(
            "ASSUMED H100 attention (no H100 attention table was available): the A100 kernels"
            " sped up as the same layer's per-token operations are in Vidur's H100 vs A100"
            f" tables, x{t.memory_speedup:.2f} for decode (memory-bound: 1-16 tokens) and"
            f" x{t.compute_speedup:.2f} for prefill (compute-bound: 4096 tokens; about"
            " FlashAttention-3 on Hopper over FlashAttention-2 on Ampere); launch terms kept."
        )
    paragraphs += [
        "Composition as Vidur's execution-time model with its defaults: per layer the"
        " per-token operations at the step's token count (rounded up to 8) + the prefill"
        " kernel at (sqrt(sum n^2), sum c), x1.1 for several prompts, + the decode kernel at"
        " (batch, mean context rounded up to 64), x1.1 for batch > 1, times the layers. CPU"
        " overheads are not included (Vidur's skip_cpu_overhead_modeling default; its"
        " cpu_overheads.csv is an old-engine A100 measurement).",
        "Ops the data lacks: the LM head, ASSUMED = the measured mlp_up_proj at one token per"
        " sequence x vocab / (2 x intermediate); sampling; the KV-cache write (not in these"
        " older tables; 0, as Vidur does).",
        f"Fit: {d.fit.num_points} grid steps (prefill-only, 1-4 prompts of 128-8192 new tokens"
        " after 0-16k cached; decode-only, batch 1-256 x 128-16k context; mixed) within"
        " max_num_batched_tokens and the KV capacity; NNLS of relative errors; fit.mape and"
        " fit.max_error are fractions (mean and max of |fit/grid - 1|).",
        f"KV: bf16, {model.layers} layers x 2 x {model.kv_heads // spec.tp} kv heads x"
        f" {model.head_dim} x 2 B per GPU. Capacity: 0.9 x {spec.hbm_bytes_per_gpu / GIB:.1f}"
        f" GiB - bf16 weights / TP ({model.parameters * 2 / spec.tp / GIB:.1f} GiB) -"
        f" {spec.activation_reserve_bytes / GIB:.0f} GiB ASSUMED activation, CUDA-graph and"
        " NCCL reserve. Limits: vLLM v1 defaults. The model's own context limit is"
        f" {model.max_model_len} tokens.",
    ]
    return _wrap(paragraphs)


SIMULATED_MAX_MODEL_LEN = {1: 32_768, 4: 131_072}
"""The context the simulator runs each profile at, beyond Llama-2's own 4,096 (Mooncake's
conversation trace averages 12k prompt tokens): 32k for 7B, as its long-context variants of the
same architecture (e.g. LLaMA-2-7B-32K); 128k for 70B on 4 GPUs, as Mooncake's own evaluation of a
LLaMA2-70B-like model. Past 4,096 the step model extrapolates (see the source note)."""


def profile_yaml(d: Derived, vidur_commit: str) -> str:
    profile = EngineProfile(
        name=d.spec.name,
        model=d.spec.model.hf_name,
        hardware=d.spec.hardware,
        source=source_text(d, vidur_commit),
        step=d.fit.step,
        kv_bytes_per_token=kv_bytes_per_token(d.spec.model, d.spec.tp),
        hbm_kv_tokens=d.kv_tokens,
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        max_model_len=SIMULATED_MAX_MODEL_LEN[d.spec.tp],
        tensor_parallel=d.spec.tp,
    )
    return simulator.profile.profile_yaml(profile, d.fit)


def summary(d: Derived) -> str:
    lines = [
        f"{d.spec.name}: points={d.fit.num_points} mape={d.fit.mape:.4f} max={d.fit.max_error:.4f}",
        "  coef " + " ".join(_g(v) for v in astuple(d.fit.step)),
        "  attention decode "
        + " ".join(_g(v) for v in d.attention.decode_coef)
        + " prefill "
        + " ".join(_g(v) for v in d.attention.prefill_coef),
        f"  transfer {d.transfer}",
        "  checks " + " ".join(f"{k}={v:.2f}" for k, v in d.checks.items()),
        f"  kv_tokens={d.kv_tokens}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--vidur", type=Path, required=True, help="local Vidur copy")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--dry-run", action="store_true", help="print, write nothing")
    args = parser.parse_args(argv)
    data = VidurData(args.vidur)
    commit = data.commit()
    for spec in PROFILES:
        derived = derive(data, spec)
        print(summary(derived), file=sys.stderr)
        path = args.out / f"{spec.name}.yaml"
        text = profile_yaml(derived, commit)
        if args.dry_run:
            print(f"--- {path}\n{text}")
        else:
            path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
