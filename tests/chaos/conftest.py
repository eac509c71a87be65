"""Fixtures of the chaos suite: its size (shortened or full) and the figures each test reports.

Every chaos test injects one fault (docs/reliability.md lists them), checks its pass criterion,
and stops by itself: each carries ``@pytest.mark.timeout(...)`` sized for the full form. Sizes
(durations, request counts, kill points) come from :func:`chaos_size`: the shortened form runs in
`make test`, the full one in `make chaos` (``--chaos-full``). Tests that exist only at full length
(the soak, the 10-minute runs) are marked ``slow`` and skip themselves in the shortened form.

Figures (success rate, recovery time, memory growth, ...) go through the ``chaos_report`` fixture:
one JSON file per test in ``$STRATA_CHAOS_RESULTS`` (default ``.cache/chaos-results/``), each
with the mode it ran in, and a line per figure in pytest's terminal summary.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.chaos.load import Knee, Workload, measure_knee
from tests.conftest import REPO_ROOT

T = TypeVar("T")

_REPORTED: list[tuple[str, dict[str, Any]]] = []


@dataclass(frozen=True)
class ChaosSize:
    """Which form of the suite runs: ``pick(short, full)`` sizes a test for it."""

    full: bool

    @property
    def mode(self) -> str:
        return "full" if self.full else "short"

    def pick(self, short: T, full: T) -> T:
        return full if self.full else short

    def require_full(self) -> None:
        """For tests that exist only at full length (marked slow): skip in the shortened form."""
        if not self.full:
            pytest.skip("full length only: make chaos (--chaos-full)")


@pytest.fixture(scope="session")
def chaos_size(request: pytest.FixtureRequest) -> ChaosSize:
    return ChaosSize(full=bool(request.config.getoption("--chaos-full")))


class KneeCache:
    """The knee of each kind of cluster, measured once per session (several tests load at
    0.7x the knee of the same kind of cluster: `strata serve` with the tiny model, say)."""

    def __init__(self, chaos_size: ChaosSize) -> None:
        self._size = chaos_size
        self._knees: dict[str, Knee] = {}

    def get(self, key: str, base_url: str, model: str, workload: Workload | None = None) -> Knee:
        """The knee of the cluster kind ``key``; measured on the gateway at ``base_url`` (with
        ``workload``, default :class:`Workload()`) the first time this session asks for it."""
        if key not in self._knees:
            self._knees[key] = measure_knee(
                base_url,
                model,
                workload or Workload(),
                # 10 s steps even in the short form: a step's p99 TTFT (the SLO of the overload
                # row) from ~150 requests, not ~90, so one slow request does not make it.
                step_s=self._size.pick(10.0, 15.0),
            )
        return self._knees[key]


@pytest.fixture(scope="session")
def chaos_knee(chaos_size: ChaosSize) -> KneeCache:
    return KneeCache(chaos_size)


def results_dir() -> Path:
    return Path(os.environ.get("STRATA_CHAOS_RESULTS", REPO_ROOT / ".cache" / "chaos-results"))


@pytest.fixture
def chaos_report(
    request: pytest.FixtureRequest, chaos_size: ChaosSize
) -> Iterator[Callable[..., None]]:
    """``chaos_report(name=value, ...)`` records figures of this test (merged over calls); the
    file is written when the test ends, passed or not, with its outcome."""
    figures: dict[str, Any] = {}

    def report(**values: Any) -> None:
        figures.update(values)

    yield report
    if not figures:
        return
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid.split("::", 1)[-1])
    record = {
        "test": request.node.nodeid,
        "mode": chaos_size.mode,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "figures": figures,
    }
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.{chaos_size.mode}.json").write_text(json.dumps(record, indent=2) + "\n")
    _REPORTED.append((request.node.nodeid, figures))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _REPORTED:
        return
    terminalreporter.section("chaos figures")
    for nodeid, figures in _REPORTED:
        terminalreporter.write_line(nodeid)
        for key, value in figures.items():
            terminalreporter.write_line(f"    {key}: {value}")
