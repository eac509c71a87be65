"""Row "soak": 2 h under load at 0.7x the knee with a fault every 10 min; errors <= 0.1 %
outside the fault windows, RSS growth <= 5 % per process after warm-up, no KV held when idle
(no store reservation or lease, no engine request, no KV block held in any engine).

Full length only (``make chaos``). Its length and fault interval are parameters, for a shorter
manual run: ``STRATA_SOAK_DURATION_S`` (default 7200) and ``STRATA_SOAK_FAULT_INTERVAL_S``
(default 600), e.g. ``STRATA_SOAK_DURATION_S=480 STRATA_SOAK_FAULT_INTERVAL_S=60 pytest
tests/chaos/test_soak.py --chaos-full`` (at least ~7 intervals: every process is judged, the
store node restarted after its kill included, an interval after the burst that follows it).

Cluster (tests/chaos/cluster.py): one store node, one prefill and two decode workers, the gateway
as its own process; the test restarts what it kills on the same ports. After a warm-up of half an
interval, the faults come every interval, in turn: SIGKILL of the first decode worker (engine
included; restarted), an overload burst (2.3x the knee on top of the load, for a quarter
interval), SIGKILL of the prefill worker (restarted), a burst, SIGKILL of the store node
(restarted, empty), a burst. A fault's window runs from the fault until 15 s after the cluster
is whole again (the burst: until 15 s after it ends); a request counts against the error budget
if it overlaps no window.

Memory: the RSS of each process tree (store, each worker with its engine, gateway) is sampled
with psutil every 5 s while it lives. Its baseline is taken once it is warm: when it has been
through an overload burst (the window's end), and at least ``RSS_SETTLE_S`` after its restart.
Each end is the median of ``RSS_SPAN_S`` of samples (the baseline: the span from that moment;
the end: the span before the last sample), not one sample: an engine's RSS steps by ~100 MiB
within a minute when its allocator trims or a cache fills, and a single sample can catch
either side (docs/reliability.md, the fourth run).
A burst is where a process meets the load's largest shapes for the first time, and keeps what
they need: an engine's model runner caches one oneDNN primitive set per batch shape it has run
(bounded by ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, which the soak's workers set to
``ONEDNN_CACHE`` so that the warm-up and the first burst fill it; dataplane/README.md "The
engine's memory"), the
gateway's allocator pools grow to the burst's concurrency. Each burst follows a kill, so every
incarnation meets one within an interval of its start. Each one watched for at least one
interval — from its baseline to the end, or to the fault that killed it — may grow by 5 % at
most (from its baseline to its end). The report keeps each process's series (one sample
a minute) so that a failed run shows when the memory grew. Idle at the end: no sequence running
in any engine, no lease or write held in the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from strata_proto import worker_pb2
from tests.chaos.cluster import (
    Cluster,
    engine_blocks_in_use,
    kill_tree,
    start_cluster,
    store_stats,
)
from tests.chaos.conftest import ChaosSize, KneeCache
from tests.chaos.load import BackgroundLoad, Result, Workload, summarize
from tests.e2e.dataplane_processes import Process, stub

DURATION_S = float(os.environ.get("STRATA_SOAK_DURATION_S", "7200"))
FAULT_INTERVAL_S = float(os.environ.get("STRATA_SOAK_FAULT_INTERVAL_S", "600"))
WINDOW_GRACE_S = 15.0
RSS_SETTLE_S = min(420.0, 0.7 * FAULT_INTERVAL_S)
"""A restarted process's start-up before its RSS baseline: an engine's heap grows 10-15 % over
its first minutes of serving, a store node's arena fills over ~6 minutes (docs/reliability.md)."""
RSS_SPAN_S = min(180.0, 0.25 * FAULT_INTERVAL_S)
ONEDNN_CACHE = 128
"""The engines' oneDNN primitive cache capacity (``--engine-onednn-cache``): 1,024 by default
holds ~270 MiB with the tiny model, filled only as rare batch shapes come, over hours."""
FAULTS = ("kill_decode", "overload", "kill_prefill", "overload", "kill_store", "overload")
SERIES_STEP_S = 60.0


@dataclass
class Watched:
    """One process tree's RSS while it lives: every sample, its baseline (the median of the
    ``RSS_SPAN_S`` from when it was warm) and its end (the median of the span before its last
    sample: at the end of the run, or just before the test killed it)."""

    name: str
    pid: int
    started_at: float
    """When the test first saw it (the end of the warm-up for a process running from the start)."""
    restarted: bool
    warm_at: float | None = None
    samples: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    """(seconds into the run, bytes), one per ``watch``."""

    def sample(self, now: float, rss: int) -> None:
        self.samples.append((now, rss))

    def _median(self, start: float, end: float) -> int:
        return int(statistics.median(r for t, r in self.samples if start <= t <= end))

    @property
    def baseline_at(self) -> float | None:
        """When the baseline's span ended (None: not warm yet, or the span not over)."""
        if self.warm_at is None or self.samples[-1][0] < self.warm_at + RSS_SPAN_S:
            return None
        return self.warm_at + RSS_SPAN_S

    @property
    def baseline(self) -> int | None:
        if self.baseline_at is None or self.warm_at is None:
            return None
        return self._median(self.warm_at, self.baseline_at)

    @property
    def final_at(self) -> float:
        return self.samples[-1][0]

    @property
    def final(self) -> int:
        return self._median(self.final_at - RSS_SPAN_S, self.final_at)

    def series(self) -> list[tuple[float, int]]:
        """(seconds into the run, MiB), one sample per ``SERIES_STEP_S``."""
        out: list[tuple[float, int]] = []
        for t, rss in self.samples:
            if not out or t - out[-1][0] >= SERIES_STEP_S:
                out.append((round(t, 1), rss >> 20))
        return out


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total


@pytest.fixture
def cluster(tiny_model_dir: Path, chaos_size: ChaosSize) -> Iterator[Cluster]:
    chaos_size.require_full()
    yield from start_cluster(
        tiny_model_dir,
        decode=2,
        separate_gateway=True,
        worker_args=("--max-model-len", "1024", "--engine-onednn-cache", str(ONEDNN_CACHE)),
    )


@pytest.mark.slow
@pytest.mark.timeout(DURATION_S + 1800)
def test_soak(
    cluster: Cluster,
    chaos_size: ChaosSize,
    chaos_knee: KneeCache,
    chaos_report: Callable[..., None],
) -> None:
    chaos_size.require_full()
    knee = chaos_knee.get("tiny-1p2d", cluster.url, cluster.model)
    rate = 0.7 * knee.rate
    workload = Workload(seed=2024, prompt_words=60, max_tokens=16)
    windows: list[tuple[str, float, float]] = []
    watched: list[Watched] = []

    def processes() -> dict[str, Process]:
        found = {"store": cluster.store, "prefill0": cluster.prefills[0]}
        found |= {f"decode{i}": p for i, p in enumerate(cluster.decodes)}
        assert cluster.gateway is not None
        return found | {"gateway": cluster.gateway}

    def warm(w: Watched, now: float) -> bool:
        """Whether ``w`` has been through a burst (its window over) and settled after a restart."""
        settled = not w.restarted or now >= w.started_at + RSS_SETTLE_S
        return settled and any(
            f == "overload" and start >= w.started_at and end <= now for f, start, end in windows
        )

    def watch(now: float) -> None:
        """Take baselines that are due, sample the watched ones still alive; start watching
        processes not watched yet."""
        known = {w.pid for w in watched}
        restarted = bool(watched)  # the first call (the end of the warm-up) finds the originals
        for name, process in processes().items():
            if process.proc.pid not in known:
                watched.append(Watched(name, process.proc.pid, now, restarted))
        for w in watched:
            rss = tree_rss(w.pid)
            if not rss:
                continue  # killed: its last sample stays its final one
            w.sample(now, rss)
            if w.warm_at is None and warm(w, now):
                w.warm_at = now

    with BackgroundLoad(cluster.url, cluster.model, workload, rate, DURATION_S) as load:
        warmup_s = FAULT_INTERVAL_S / 2
        time.sleep(warmup_s)
        watch(load.now())
        k = 0
        while load.now() + FAULT_INTERVAL_S <= DURATION_S:
            fault = FAULTS[k % len(FAULTS)]
            start = load.now()
            _inject(fault, k, cluster, knee.rate, workload)
            end = load.now() + WINDOW_GRACE_S
            windows.append((fault, start, end))
            k += 1
            next_at = warmup_s + k * FAULT_INTERVAL_S
            while load.now() < next_at:
                watch(load.now())
                time.sleep(min(5.0, max(0.0, next_at - load.now())))
        while load.now() < DURATION_S - 5:
            watch(load.now())
            time.sleep(5.0)
        watch(load.now())
    results = load.results()

    time.sleep(10.0)  # idle
    idle_store = store_stats(cluster.store.endpoint)
    stats = {
        p.endpoint: stub(p.endpoint).Stats(worker_pb2.StatsRequest(), timeout=30)
        for p in [*cluster.prefills, *cluster.decodes]
    }
    running = {endpoint: s.num_running for endpoint, s in stats.items()}
    engines = engine_blocks_in_use([*cluster.prefills, *cluster.decodes])

    outside = [r for r in results if not _overlaps(r, windows)]
    errors = [r for r in outside if not r.ok]
    judged_ones = [
        w
        for w in watched
        if w.baseline_at is not None and w.final_at - w.baseline_at >= min(FAULT_INTERVAL_S, 600)
    ]
    growth = {
        f"{w.name}:{w.pid}": round((w.final - base) / base, 4)
        for w in judged_ones
        if (base := w.baseline)
    }
    figures: dict[str, Any] = {
        **knee.figures(),
        "rate_rps": round(rate, 3),
        "duration_s": DURATION_S,
        "fault_interval_s": FAULT_INTERVAL_S,
        "faults": [(f, round(s, 1), round(e, 1)) for f, s, e in windows],
        **summarize(results).figures("all_"),
        "requests_outside_windows": len(outside),
        "errors_outside_windows": len(errors),
        "error_rate_outside_windows": round(len(errors) / max(1, len(outside)), 5),
        "rss_growth": growth,
        "rss_span_s": RSS_SPAN_S,
        "engine_onednn_cache": ONEDNN_CACHE,
        "rss_baseline_mib": {f"{w.name}:{w.pid}": (w.baseline or 0) >> 20 for w in judged_ones},
        "rss_final_mib": {f"{w.name}:{w.pid}": w.final >> 20 for w in judged_ones},
        "rss_started_at_s": {f"{w.name}:{w.pid}": round(w.started_at, 1) for w in watched},
        "rss_warm_at_s": {
            f"{w.name}:{w.pid}": round(w.warm_at, 1) for w in watched if w.warm_at is not None
        },
        "rss_series_mib": {f"{w.name}:{w.pid}": w.series() for w in watched if w.samples},
        "idle_store_writing": idle_store["num_writing"],
        "idle_store_leases": idle_store["num_leases"],
        "idle_running": sum(running.values()),
        "idle_engine_blocks_in_use": {e: held for e, (held, _) in engines.items()},
        # The model runners' heap trims (strata_common/heap.py) of the workers running at the end.
        "engine_heap_trims": {e: s.engine_heap_trims for e, s in stats.items()},
        "engine_heap_trimmed_mib": {e: s.engine_heap_trimmed_bytes >> 20 for e, s in stats.items()},
        "engine_heap_trim_ms": {
            e: round(1000 * s.engine_heap_trim_time_s / max(1, s.engine_heap_trims), 1)
            for e, s in stats.items()
        },
    }
    chaos_report(**figures)
    assert windows, "no fault was injected: the run is shorter than one fault interval"
    assert len(errors) <= 0.001 * len(outside), [(r.index, r.status, r.error) for r in errors][:10]
    judged = {key.split(":")[0] for key in growth}
    # Every process, the restarted ones included, is judged at least once (a run too short to
    # watch each one an interval after a burst is no soak: it fails here).
    assert set(processes()) <= judged, (judged, figures)
    assert all(g <= 0.05 for g in growth.values()), figures
    assert idle_store["num_writing"] == 0 and idle_store["num_leases"] == 0, figures
    assert not any(running.values()), figures
    # Free KV blocks back to the baseline: an idle engine holds none.
    assert not any(held for held, _ in engines.values()), figures


def _overlaps(result: Result, windows: list[tuple[str, float, float]]) -> bool:
    return any(result.start <= end and result.end >= start for _, start, end in windows)


def _inject(fault: str, k: int, cluster: Cluster, knee_rps: float, workload: Workload) -> None:
    """Inject ``fault`` and return once the cluster is whole again."""
    if fault == "kill_decode":
        # Always the first: the second decode worker runs the whole soak, its memory judged from
        # its first burst to the end.
        dead = cluster.decodes[0]
        kill_tree(dead)
        cluster.restart_worker(dead)
    elif fault == "kill_prefill":
        dead = cluster.prefills[0]
        kill_tree(dead)
        cluster.restart_worker(dead)
    elif fault == "kill_store":
        cluster.store.stop(signal.SIGKILL)
        cluster.restart_store()
    else:
        burst_s = FAULT_INTERVAL_S / 4
        burst = dataclasses.replace(workload, seed=workload.seed + 1000 + k)
        with BackgroundLoad(cluster.url, cluster.model, burst, 2.3 * knee_rps, burst_s):
            pass  # the burst runs its length; leaving waits for its requests
