"""The simulator against reality on this host: one trace slice through `strata serve` and through
`strata simulate` with the profile `strata profile` measured on serve's own engines.

    .venv/bin/python benchmarks/bench_sim_vs_real.py [--model-dir DIR] [--num-requests 200]
        [--rates 1,3] [--trace ../shared/traces/conversation_trace.jsonl] [--out DIR]

Issue 13, acceptance 1. One run:

1. starts `strata serve` (1 prefill + 1 decode engine, each pinned to its core as serve does; the
   default model, SmolLM2-135M-Instruct, unless ``--model-dir``) and waits until both workers
   are ready and the gateway's own start-up profiles are done;
2. measures the profile: `strata profile` on serve's two workers (prefill points on the
   prefill worker, decode steps on the decode worker; grid up to ``--profile-max-model-len``
   tokens and batch ``--profile-max-batch``);
3. warms the engines with a replay of the same slice on token ids no measured load uses, then
   replays the first ``--num-requests`` requests of the trace at each rate
   (loadtests/replay_trace.py: open loop, each 512-token trace block as 16 tokens, outputs
   capped at 64, ``--per-request``), each load on its own token range so that no load hits
   another's prefixes (the simulation starts each rate with empty caches);
4. simulates the same slice at the same rates (`strata simulate --per-request`) with a config
   of this rig written next to the results: the measured profile, two instances (1 prefill, 1
   decode) on one host, the store's shared-memory path at the end-to-end KV bandwidth measured in
   docs/benchmarks.md, Strata's policy and connector timing (KV saved and loaded within the
   engine's step), the gateway's defaults;
5. compares request by request (the trace's index): TTFT and TPOT mean absolute percentage error
   over the requests both served, and SLO attainment (TTFT <= ``--slo-ttft-ms`` and TPOT <=
   ``--slo-tpot-ms``) of each. Goal: MAPE <= 15 %, attainment within 5 points, at two loads.

Prints a markdown table; ``--out`` keeps the profile, the config, every report and
``comparison.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import Server, free_port, host_info, load_avg, log  # noqa: E402

READY = re.compile(r"strata: serving \S+ on ")
WORKER_READY = re.compile(r"strata worker ready role=(\w+) listening on (\S+)")
TRACE = REPO_ROOT.parent / "shared" / "traces" / "conversation_trace.jsonl"
E2E_KV_BANDWIDTH = "1.4GB"
"""KV moved end to end through the store on this kind of host (docs/benchmarks.md: 1.35-1.45
GB/s, prefill save and decode load as the engines see them)."""
TOKEN_RANGES = ((2100, 3100), (100, 1100), (1100, 2100), (3100, 4100), (4100, 5100))
"""Token ids of the warm-up, then of each load in turn (disjoint: no load shares a prefix)."""


def run(argv: list[str], what: str) -> str:
    log(f"{what}: {' '.join(argv)}")
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def replay(
    url: str, args: argparse.Namespace, rate: float, tokens: tuple[int, int], out: Path
) -> dict[str, Any]:
    argv = [sys.executable, "loadtests/replay_trace.py", "--url", url, "--trace", str(args.trace)]
    argv += ["--num-requests", str(args.num_requests), "--rate", str(rate), "--per-request"]
    argv += ["--token-low", str(tokens[0]), "--token-high", str(tokens[1]), "--out", str(out)]
    argv += ["--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms)]
    argv += ["--slo-headers"]  # the simulated gateway admits by the config's SLOs: the same here
    run(argv, f"replay at {rate:g} req/s")
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def rig_config(profile: Path, args: argparse.Namespace) -> str:
    rates = ", ".join(repr(r) for r in args.rates)  # results.json keys them by str(rate)
    return f"""# This host's rig as `strata serve` runs it (bench_sim_vs_real.py).
name: cpu-rig
profile: {profile}
trace: {args.trace.resolve()}
num_requests: {args.num_requests}
gpus: 2
gpus_per_host: 2
network: tcp
transfers:
  shm: {{latency: 1ms, bandwidth: {E2E_KV_BANDWIDTH}}}
store: {{dram: 2GiB, ssd: 16GiB, eviction_policy: lru}}
cache_block_tokens: 16
kv_block_tokens: 16
gateway_overhead: {args.gateway_overhead_ms:g}ms
slo: {{ttft: {args.slo_ttft_ms:g}ms, tpot: {args.slo_tpot_ms:g}ms}}
rates: [{rates}]
replay: {{block_tokens: 16, max_output_tokens: 64}}
strata_setup: strata
setups:
  - {{name: strata, shape: disaggregated, prefill_gpus: 1, policy: slo_aware,
     kv_load: sync, kv_save: sync, local_prefill_threshold_tokens: 0}}
"""


def mape(pairs: list[tuple[float, float]]) -> float | None:
    """Mean of |simulated - real| / real over (real, simulated) pairs."""
    return statistics.fmean(abs(s - r) / r for r, s in pairs) if pairs else None


def compare(
    real: dict[str, Any], simulated: list[list[Any]], ttft_slo_s: float, tpot_slo_s: float
) -> dict[str, Any]:
    reals = {o["index"]: o for o in real["per_request"]}
    sims = {int(i): (ttft, tpot) for i, ttft, tpot in simulated}

    def real_met(o: dict[str, Any]) -> bool:
        if o["status"] != 200 or o["error"] or o["ttft_s"] is None:
            return False
        return o["ttft_s"] <= ttft_slo_s and (o["tpot_s"] is None or o["tpot_s"] <= tpot_slo_s)

    def sim_met(ttft: float | None, tpot: float | None) -> bool:
        return ttft is not None and ttft <= ttft_slo_s and (tpot is None or tpot <= tpot_slo_s)

    both = [
        i for i in reals if i in sims and reals[i]["ttft_s"] is not None and sims[i][0] is not None
    ]
    ttft = [(reals[i]["ttft_s"], sims[i][0]) for i in both]
    tpot = [(reals[i]["tpot_s"], sims[i][1]) for i in both if reals[i]["tpot_s"] and sims[i][1]]
    real_attainment = sum(real_met(o) for o in reals.values()) / len(reals)
    sim_attainment = sum(sim_met(*v) for v in sims.values()) / len(sims)
    return {
        "requests": len(reals),
        "served_by_both": len(both),
        "ttft_mape": mape(ttft),
        "tpot_mape": mape(tpot),
        "ttft_p50_ms": {
            "real": 1e3 * statistics.median(r for r, _ in ttft) if ttft else None,
            "sim": 1e3 * statistics.median(s for _, s in ttft) if ttft else None,
        },
        "tpot_p50_ms": {
            "real": 1e3 * statistics.median(r for r, _ in tpot) if tpot else None,
            "sim": 1e3 * statistics.median(s for _, s in tpot) if tpot else None,
        },
        "attainment": {"real": real_attainment, "sim": sim_attainment},
        "attainment_gap_points": 100 * abs(real_attainment - sim_attainment),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="default: serve's default model")
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--rates", type=lambda s: [float(r) for r in s.split(",")], default=[1.0, 3.0])
    ap.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=200.0)
    ap.add_argument("--gateway-overhead-ms", type=float, default=5.0)
    ap.add_argument("--profile-max-model-len", type=int, default=1024)
    ap.add_argument("--profile-max-batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="keep everything here")
    args = ap.parse_args(argv)
    increasing = all(a < b for a, b in zip(args.rates, args.rates[1:], strict=False))
    if len(args.rates) + 1 > len(TOKEN_RANGES) or not increasing or args.rates[0] <= 0:
        ap.error(f"--rates: 1 to {len(TOKEN_RANGES) - 1} rates > 0, strictly increasing")
    out = args.out or Path(tempfile.mkdtemp(prefix="strata-sim-vs-real-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="strata-sim-vs-real-serve-"))
    port, admin_port = free_port(), free_port()
    serve = [sys.executable, "-m", "strata", "serve", "--port", str(port), "--no-kv-ssd"]
    model_dir = args.model_dir or REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
    if not (model_dir / "config.json").is_file():
        ap.error(f"{model_dir}: no model there (make serve prepares the default one)")
    serve += ["--admin-port", str(admin_port), "--cache-dir", str(work), "--model", str(model_dir)]
    server = Server("serve", serve, {}, out / "serve.log")
    log(f"host: {host_info()}")
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_for(READY, 1200)
        lines = server.wait_for(WORKER_READY, 1200, count=2)
        workers = {m.group(1): m.group(2) for ln in lines if (m := WORKER_READY.search(ln))}
        time.sleep(45)  # the gateway's own start-up profiles (--profile-budget, 40 s)
        profile = out / "profile.yaml"
        stdout = run(
            [
                sys.executable, "-m", "strata", "profile",
                "--worker", workers["prefill"], "--worker", workers["decode"],
                "--model-dir", str(model_dir), "--cluster-key-file", str(work / "cluster.key"),
                "--out", str(profile), "--name", f"{model_dir.name}-cpu-rig",
                "--max-model-len", str(args.profile_max_model_len),
                "--max-batch", str(args.profile_max_batch),
            ],
            "strata profile",
        )  # fmt: skip
        log(stdout.strip())
        replay(url, args, args.rates[-1], TOKEN_RANGES[0], out / "warmup.json")
        reals = {
            rate: replay(url, args, rate, TOKEN_RANGES[1 + i], out / f"replay-{rate:g}.json")
            for i, rate in enumerate(args.rates)
        }
        loads = load_avg()
    finally:
        server.stop()
    config = out / "cpu-rig.yaml"
    config.write_text(rig_config(profile, args))
    sim_dir = out / "simulation"
    run(
        [sys.executable, "-m", "strata", "simulate", "--config", str(config), "--out", str(sim_dir),
         "--per-request", "true", "--jobs", "1"],
        "strata simulate",
    )  # fmt: skip
    simulated = json.loads((sim_dir / "results.json").read_text())["policies"]["strata"]
    rows = {
        rate: compare(
            reals[rate],
            simulated["requests"][str(rate)],
            args.slo_ttft_ms / 1e3,
            args.slo_tpot_ms / 1e3,
        )
        for rate in args.rates
    }
    (out / "comparison.json").write_text(json.dumps({str(r): v for r, v in rows.items()}, indent=2))
    print(f"## Simulator vs `strata serve` ({model_dir.name}, {args.num_requests} requests)\n")
    print(f"host: {host_info()}; load average at the end {loads}; results in {out}\n")
    print("| rate (req/s) | served by both | TTFT MAPE | TPOT MAPE | TTFT p50 real / sim (ms) "
          "| TPOT p50 real / sim (ms) | attainment real / sim |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for rate, row in rows.items():

        def pct(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.1f} %"

        def pair(values: dict[str, float | None]) -> str:
            return " / ".join("-" if v is None else f"{v:.1f}" for v in values.values())

        print(
            f"| {rate:g} | {row['served_by_both']}/{row['requests']} | {pct(row['ttft_mape'])} | "
            f"{pct(row['tpot_mape'])} | {pair(row['ttft_p50_ms'])} | {pair(row['tpot_p50_ms'])} | "
            f"{pct(row['attainment']['real'])} / {pct(row['attainment']['sim'])} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
