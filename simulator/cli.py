"""``strata simulate --config FILE [--trace PATH] [--out DIR]``: the sweep of a config's setups
over its rates, a progress bar, then ``DIR/results.json`` and the plots (goodput.png, cdf.png).

Exit status: 0 done, 1 a config, profile or trace that cannot be used (the message names the
file and the field), 2 bad flags.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from strata_common.options import from_cli, option

__all__ = ["SimulateArgs", "main"]


@dataclass(frozen=True, slots=True)
class SimulateArgs:
    config: Path = option(help="the simulation's config file (YAML; simulator/configs/)")
    trace: Path | None = option(None, help="a Mooncake-format trace (default: the config's)")
    out: Path = option(Path("simulation"), help="folder for results.json and the plots")
    jobs: int = option(0, help="processes to run points in (0: one per CPU)")
    num_requests: int = option(0, help="replay only the first N requests (0: the config's)")
    per_request: bool = option(
        False, help="every request's TTFT and TPOT in results.json (policies.NAME.requests)"
    )

    def __post_init__(self) -> None:
        if self.jobs < 0 or self.num_requests < 0:
            raise ValueError("--jobs and --num-requests must be >= 0")


def main(argv: list[str] | None = None) -> int:
    args = from_cli(
        SimulateArgs,
        argv,
        env_prefix="STRATA_SIMULATE_",
        prog="strata simulate",
        description=__doc__,
    )
    from tqdm import tqdm

    from simulator.config import load_config
    from simulator.runner import sweep, write_results

    try:
        config = load_config(args.config)
        total = len(config.setups) * len(config.rates)
        with tqdm(total=total, unit="point", desc=config.name) as bar:

            def advance(result: object) -> None:
                bar.update(1)

            config, trace, results = sweep(
                args.config,
                trace_path=args.trace,
                num_requests=args.num_requests,
                jobs=args.jobs,
                per_request=args.per_request,
                progress=advance,
            )
        data = write_results(args.out, config, trace, args.config, results)
    except ValueError as exc:
        print(f"strata simulate: {exc}", file=sys.stderr)
        return 1
    width = max(len(name) for name in data["policies"])
    print(f"{len(trace.requests)} requests of {trace.source}; rate at 90 % SLO attainment:")
    for name, entry in data["policies"].items():
        mark = "  <- strata" if name == data["strata_policy"] else ""
        costs = [p["gpu_s_per_1k_met"] for p in entry["points"]]
        cost = " ".join("-" if c is None else f"{c:.0f}" for c in costs)
        print(
            f"  {name:<{width}}  {entry['rate_at_90']:8.3f} req/s   GPU-s per 1k met: {cost}{mark}"
        )
    ratio = data["strata_vs_best_baseline"]
    if ratio is not None:
        print(f"strata / best baseline: {ratio:.3f}")
    planned = any("pools" in entry for entry in data["policies"].values())
    plots = "goodput.png, cdf.png" + (", pools.png" if planned else "")
    print(f"results: {args.out / 'results.json'}, plots: {plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
