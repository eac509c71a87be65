"""The sweep: every setup at every rate, in parallel processes, then ``results.json`` and the
plots (docs/design/simulator.md §6).

Each point is one :class:`~simulator.loop.Simulation`, a pure function of (config, setup,
trace, rate), run in a worker process that reads the config and the trace itself (they are
files; nothing but names crosses the process boundary).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.config import SimConfig, load_config
from simulator.loop import Simulation
from simulator.results import ATTAINMENT_TARGET, Point, rate_at, summarize
from simulator.trace import Trace, load_trace

__all__ = ["PointResult", "run_point", "sweep", "write_results"]


@dataclass(frozen=True, slots=True)
class PointResult:
    setup: str
    point: Point
    ttfts_s: tuple[float, ...]
    tpots_s: tuple[float, ...]
    pools: tuple[tuple[float, int, int], ...] = ()
    """(seconds, prefill instances, decode instances) at each change of a planner's pools."""
    requests: tuple[tuple[int, float | None, float | None], ...] = ()
    """With ``per_request``: (trace index, TTFT, TPOT) of every request, None where it has none
    (refused, unfinished; TPOT of one token)."""


@functools.lru_cache(maxsize=4)
def _inputs(config_path: str, trace_path: str | None, num_requests: int) -> tuple[SimConfig, Trace]:
    config = load_config(Path(config_path))
    trace_file = Path(trace_path) if trace_path else config.trace
    if trace_file is None:
        raise ValueError(f"{config_path}: no trace (give trace: in the file or --trace)")
    limit = num_requests or config.num_requests
    trace = load_trace(trace_file, limit=limit, block_tokens=config.cache_block_tokens)
    return config, trace.scaled(config.replay) if config.replay is not None else trace


def run_point(
    config_path: str,
    trace_path: str | None,
    num_requests: int,
    setup_name: str,
    rate: float,
    per_request: bool = False,
) -> PointResult:
    """One setup at one rate (in whatever process calls it); ``per_request``: keep every
    request's TTFT and TPOT."""
    config, trace = _inputs(config_path, trace_path, num_requests)
    setup = config.setup(setup_name)
    simulation = Simulation(config, setup, trace.at_rate(rate, config.rate_profile))
    records = simulation.run()
    pools = simulation.pools
    point = summarize(records, rate, config.ttft_slo_s, config.tpot_slo_s, pools.gpu_seconds)
    served = [r for r in records if r.finished]
    return PointResult(
        setup_name,
        point,
        tuple(r.ttft_s for r in served),
        tuple(r.tpot_s for r in served if r.num_tokens > 1),
        tuple(pools.timeline) if setup.planner is not None else (),
        tuple(
            (
                r.index,
                r.ttft_s if r.finished else None,
                r.tpot_s if r.finished and r.num_tokens > 1 else None,
            )
            for r in records
        )
        if per_request
        else (),
    )


def sweep(
    config_path: Path,
    *,
    trace_path: Path | None = None,
    num_requests: int = 0,
    jobs: int = 0,
    per_request: bool = False,
    progress: Callable[[PointResult], None] | None = None,
) -> tuple[SimConfig, Trace, list[PointResult]]:
    """Every setup of the config at every rate; ``jobs`` processes (0: one per CPU);
    ``per_request``: every request's TTFT and TPOT in the results."""
    config, trace = _inputs(str(config_path), str(trace_path) if trace_path else None, num_requests)
    tasks = [(s.name, rate) for s in config.setups for rate in config.rates]
    args = (str(config_path), str(trace_path) if trace_path else None, num_requests)
    workers = min(len(tasks), jobs or os.cpu_count() or 1)
    results: list[PointResult] = []
    if workers <= 1:
        for name, rate in tasks:
            result = run_point(*args, name, rate, per_request)
            results.append(result)
            if progress is not None:
                progress(result)
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = [
                pool.submit(run_point, *args, name, rate, per_request) for name, rate in tasks
            ]
            for future in as_completed(futures):
                result = future.result()
                results.append(result)
                if progress is not None:
                    progress(result)
    order = {task: i for i, task in enumerate(tasks)}
    results.sort(key=lambda r: order[(r.setup, r.point.rate)])
    return config, trace, results


def results_json(
    config: SimConfig, trace: Trace, config_path: Path, results: Sequence[PointResult]
) -> dict[str, Any]:
    policies: dict[str, Any] = {}
    for setup in config.setups:
        points = [r.point for r in results if r.setup == setup.name]
        policies[setup.name] = {
            "policy": setup.policy,
            "shape": setup.shape.value,
            "prefill_gpus": setup.prefill_gpus,
            "pool": setup.pool,
            "baseline": setup.baseline and setup.name != config.strata_setup,
            "planner": setup.planner,
            "rate_at_90": round(rate_at(points, ATTAINMENT_TARGET), 4),
            "points": [p.to_json() for p in points],
        }
        per_request = [r for r in results if r.setup == setup.name and r.requests]
        if per_request:
            # [trace index, TTFT s, TPOT s] of each request by rate (simulate --per-request)
            policies[setup.name]["requests"] = {
                str(r.point.rate): [list(t) for t in r.requests] for r in per_request
            }
        if setup.planner is not None:
            policies[setup.name]["pools"] = {
                str(r.point.rate): [list(t) for t in r.pools]
                for r in results
                if r.setup == setup.name
            }
    strata = policies[config.strata_setup]["rate_at_90"]
    baselines = [s.name for s in config.setups if s.baseline and s.name != config.strata_setup]
    best = max((policies[name]["rate_at_90"] for name in baselines), default=0.0)
    return {
        "strata_policy": config.strata_setup,
        "config": str(config_path),
        "name": config.name,
        "trace": trace.source,
        "num_requests": len(trace.requests),
        "gpus": config.gpus,
        "profile": config.profile.name,
        "slo": {"ttft_s": config.ttft_slo_s, "tpot_s": config.tpot_slo_s},
        "rates": list(config.rates),
        "rate_profile": [list(p) for p in config.rate_profile],
        "replay": (
            None
            if config.replay is None
            else {
                "block_tokens": config.replay.block_tokens,
                "max_output_tokens": config.replay.max_output_tokens,
            }
        ),
        "strata_vs_best_baseline": round(strata / best, 4) if best > 0 else None,
        "policies": policies,
    }


def write_results(
    out: Path,
    config: SimConfig,
    trace: Trace,
    config_path: Path,
    results: Sequence[PointResult],
) -> dict[str, Any]:
    """``out/results.json`` and the plots; the results' dict."""
    out.mkdir(parents=True, exist_ok=True)
    data = results_json(config, trace, config_path, results)
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    _plots(out, config, data, results)
    return data


def _plots(
    out: Path, config: SimConfig, data: dict[str, Any], results: Sequence[PointResult]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, entry in data["policies"].items():
        rates = [p["rate"] for p in entry["points"]]
        left.plot(rates, [p["attainment"] for p in entry["points"]], marker="o", label=name)
        right.plot(rates, [p["goodput_rps"] for p in entry["points"]], marker="o", label=name)
    left.axhline(ATTAINMENT_TARGET, color="grey", linestyle="--", linewidth=1)
    left.set(xlabel="arrival rate (requests/s)", ylabel="SLO attainment", ylim=(0, 1.02))
    right.set(xlabel="arrival rate (requests/s)", ylabel="goodput (requests/s within SLOs)")
    left.legend(fontsize=8)
    fig.suptitle(
        f"{config.name}: {config.gpus} GPUs, {config.profile.name}, TTFT SLO "
        f"{config.ttft_slo_s:g} s, TPOT SLO {config.tpot_slo_s * 1e3:g} ms"
    )
    fig.tight_layout()
    fig.savefig(out / "goodput.png", dpi=110)
    plt.close(fig)

    # CDFs at the highest rate where the Strata setup still meets the target (else the lowest).
    strata_points = data["policies"][config.strata_setup]["points"]
    ok = [p["rate"] for p in strata_points if p["attainment"] >= ATTAINMENT_TARGET]
    rate = max(ok) if ok else config.rates[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for result in results:
        if result.point.rate != rate:
            continue
        for axis, values in ((left, result.ttfts_s), (right, result.tpots_s)):
            if values:
                xs = np.sort(np.asarray(values))
                axis.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=result.setup)
    left.axvline(config.ttft_slo_s, color="grey", linestyle="--", linewidth=1)
    right.axvline(config.tpot_slo_s, color="grey", linestyle="--", linewidth=1)
    left.set(xlabel="TTFT (s)", ylabel="share of served requests", xscale="log")
    right.set(xlabel="TPOT (s)", xscale="log")
    left.legend(fontsize=8)
    fig.suptitle(f"{config.name}: latency CDFs at {rate:g} requests/s")
    fig.tight_layout()
    fig.savefig(out / "cdf.png", dpi=110)
    plt.close(fig)

    # Pool sizes over time of each planner's run at the highest rate.
    planned = [r for r in results if r.pools and r.point.rate == config.rates[-1]]
    if planned:
        fig, axes = plt.subplots(1, len(planned), figsize=(6 * len(planned), 4), squeeze=False)
        for axis, result in zip(axes[0], planned, strict=True):
            times = [t for t, _, _ in result.pools]
            axis.step(times, [p for _, p, _ in result.pools], where="post", label="prefill")
            axis.step(times, [d for _, _, d in result.pools], where="post", label="decode")
            axis.set(xlabel="time (s)", ylabel="instances (ready or starting)")
            axis.set_title(f"{result.setup} at a peak of {config.rates[-1]:g} requests/s")
            if config.rate_profile:
                rates = axis.twinx()
                rates.plot(
                    [t for t, _ in config.rate_profile],
                    [m * config.rates[-1] for _, m in config.rate_profile],
                    color="grey", linestyle="--", linewidth=1,
                )  # fmt: skip
                rates.set_ylabel("arrival rate (requests/s)")
            axis.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        fig.savefig(out / "pools.png", dpi=110)
        plt.close(fig)
