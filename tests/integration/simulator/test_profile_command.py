"""`strata profile` against running workers (simulated engines here: real processes, real gRPC
with the cluster key; the real engines' profile is measured in docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from simulator.profile import load_profile
from tests.e2e.dataplane_processes import Process
from tests.integration.simulator.processes import PROFILE, endpoints, start_simulated


def strata_profile(*args: str | Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "strata.cli", "profile", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def workers(tiny_model_dir: Path, key_file: Path) -> Iterator[tuple[str, str]]:
    started: list[Process] = []
    try:
        for role in ("prefill", "decode"):
            started.append(start_simulated(tiny_model_dir, role, key_file, "--drain-notice", "0s"))
        yield endpoints(started[0], 1)[0], endpoints(started[1], 1)[0]
    finally:
        for process in started:
            process.stop()


def test_profile_writes_a_profile_the_simulator_reads(
    workers: tuple[str, str], tiny_model_dir: Path, key_file: Path, tmp_path: Path
) -> None:
    prefill, decode = workers
    out = tmp_path / "measured.yaml"
    done = strata_profile(
        "--worker", prefill, "--worker", decode, "--model-dir", tiny_model_dir,
        "--cluster-key-file", key_file, "--out", out,
        "--max-model-len", "512", "--max-batch", "8", "--repeats", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{out}: " in done.stdout
    profile = load_profile(out)
    simulated = load_profile(PROFILE)
    data = yaml.safe_load(out.read_text())
    # The limits are the engines' own (Health); the KV size the model's (tiny: 4 layers x K, V x
    # 2 KV heads x 32 x 2 bytes, a simulated engine's dtype being none of float32's).
    assert (profile.name, profile.hardware) == ("measured", f"simulated:{simulated.name}")
    assert (profile.hbm_kv_tokens, profile.max_num_seqs) == (
        simulated.hbm_kv_tokens // 16 * 16,
        simulated.max_num_seqs,
    )
    assert profile.kv_bytes_per_token == 4 * 2 * 2 * 32 * 2
    assert profile.max_num_batched_tokens == 2048
    # Every point is kept: the fit's count is the samples', prefill from the prefill worker.
    samples = data["samples"]
    assert data["fit"]["grid_points"] == len(samples["prefill"]) + len(samples["decode"])
    assert len(samples["prefill"]) >= 4 and len(samples["decode"]) >= 3
    assert {b for b, _, _ in samples["decode"]} == {1, 2, 4, 8}
    # The decode worker's streams span the plan's contexts (up to 512 tokens with the output),
    # although it ran one prefill point only.
    assert max(k / b for b, k, _ in samples["decode"]) > 400
    assert max(n + c for n, c, _ in samples["prefill"]) < 512
    assert "prefill points on the prefill worker" in profile.source


def test_profile_names_what_it_cannot_use(
    workers: tuple[str, str], tiny_model_dir: Path, key_file: Path, tmp_path: Path
) -> None:
    prefill, decode = workers
    out = tmp_path / "measured.yaml"
    common = ("--model-dir", tiny_model_dir, "--cluster-key-file", key_file, "--out", out)
    two_prefills = strata_profile("--worker", prefill, "--worker", prefill, *common)
    assert two_prefills.returncode == 1
    assert f"no decode (or both) worker among --worker ({prefill} is prefill)" in (
        two_prefills.stderr
    )
    no_key = strata_profile(
        "--worker", prefill, "--worker", decode, "--model-dir", tiny_model_dir, "--out", out,
        "--wait", "0s",
    )  # fmt: skip
    assert no_key.returncode == 1 and "did not become ready" in no_key.stderr
    assert "UNAUTHENTICATED" in no_key.stderr
    none = strata_profile(*common)
    assert none.returncode == 2 and "give one or two --worker" in none.stderr
    assert not out.exists()
