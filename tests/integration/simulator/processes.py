"""Simulated workers (`strata worker --engine simulated`) started as an operator starts them."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.e2e.dataplane_processes import Process, spawn
from tests.waiting import wait_until

PROFILE = Path(__file__).resolve().parents[3] / "simulator/profiles/llama2-7b-h100.yaml"
READY = r"strata worker ready .* instance=(\S+)"


def start_simulated(model: Path, role: str, key_file: Path, *args: str) -> Process:
    argv = [sys.executable, "-m", "strata.cli", "worker", "--engine", "simulated"]
    argv += ["--role", role, "--model", str(model), "--profile", str(PROFILE)]
    return spawn([*argv, "--cluster-key-file", str(key_file), *args], READY, 60)


def endpoints(process: Process, count: int) -> list[str]:
    """Every instance's endpoint, from the ready lines a process printed."""
    wait_until(lambda: sum("strata worker ready" in line for line in process.lines) >= count, 30)
    return [line.rsplit("instance=", 1)[1].split()[0] for line in process.lines if "ready" in line]
