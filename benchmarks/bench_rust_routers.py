"""vllm-router and sglang-router in PD mode before hundreds of SIMULATED engines: their CPU cost.

    /work/routers-venv/bin/pip install vllm-router sglang-router   # a venv of their own
    .venv/bin/python benchmarks/bench_rust_routers.py --router-venv /work/routers-venv \\
        [--routers vllm,sglang] [--instances 256] [--prefill-share 0.25] [--rates 50,100]
        [--duration 30] [--prompt-words 300] [--max-tokens 64] [--policy DEFAULT]

Issue 13, acceptance 4: the peers' figure beside Strata's gateway
(benchmarks/bench_gateway_scale.py), measured the same way on the same host. One process of
simulated OpenAI engines
(benchmarks/sim_openai_backend.py: filler tokens, one every 20 ms; a quarter of the ports
stand for prefill engines) serves ``--instances`` ports; each router is started in its PD mode
before all of them (vllm-router ``--vllm-pd-disaggregation``, sglang-router
``--pd-disaggregation``; their default policy unless ``--policy``; neither tokenizes here: no
tokenizer is reachable offline, and both route on text). Then, per rate, the same open-loop load
as the gateway's benchmark (Poisson arrivals, unique prompts of ``--prompt-words`` words,
streaming completions) runs for ``--duration`` seconds with ``max_tokens`` 1 and with
``--max-tokens``; the router process's CPU-seconds (every thread; psutil), less its idle rate,
per 1,000 requests and per 100,000 streamed tokens. Prints markdown on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_gateway_scale import (  # noqa: E402
    cpu_s,
    idle_cores,
    per_rate_costs,
    run_load,
)
from benchmarks.harness import Server, free_port, host_info, load_avg, log, percentile  # noqa: E402

BACKEND_READY = re.compile(r"simulated engines ready")
ROUTER_READY = {"vllm": re.compile(r"Starting server on"), "sglang": re.compile(r"Starting")}


def router_argv(kind: str, venv: Path, prefills: list[str], decodes: list[str], port: int,
                metrics_port: int, policy: str | None) -> list[str]:  # fmt: skip
    if kind == "vllm":
        argv = [str(venv / "bin" / "vllm-router"), "--vllm-pd-disaggregation"]
    else:
        argv = [str(venv / "bin" / "python"), "-m", "sglang_router.launch_router"]
        argv += ["--pd-disaggregation"]
    for url in prefills:
        argv += ["--prefill", url]
    for url in decodes:
        argv += ["--decode", url]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(metrics_port)]
    argv += ["--worker-startup-timeout-secs", "600"]
    return argv + (["--policy", policy] if policy else [])


def wait_serving(url: str, timeout_s: float) -> None:
    """Until one streamed request goes through the router."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        outcomes = asyncio.run(run_load(url, 5.0, 0.5, 5, 2, 999))
        if outcomes and all(o.status == 200 and not o.error for o in outcomes):
            return
        time.sleep(2.0)
    raise RuntimeError(f"the router at {url} did not serve within {timeout_s:.0f} s")


def measure(url: str, pid: int, rate: float, args: argparse.Namespace, max_tokens: int,
            seed: int, idle_cores: float) -> dict[str, Any]:  # fmt: skip
    cpu0 = cpu_s([pid])
    t0 = time.perf_counter()
    outcomes = asyncio.run(run_load(url, rate, args.duration, args.prompt_words, max_tokens, seed))
    wall = time.perf_counter() - t0
    cpu = cpu_s([pid]) - cpu0
    ok = [o for o in outcomes if o.status == 200 and not o.error]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    net = cpu - idle_cores * wall
    return {
        "rate": rate,
        "max_tokens": max_tokens,
        "sent": len(outcomes),
        "ok": len(ok),
        "failed": len(outcomes) - len(ok),
        "tokens": sum(o.tokens for o in ok),
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_s_per_1k": 1000 * cpu / max(1, len(ok)),
        "net_cpu_s_per_1k": 1000 * net / max(1, len(ok)),
        "ttft_p50_ms": 1e3 * percentile(ttfts, 50) if ttfts else float("nan"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--router-venv", type=Path, required=True, help="where the routers are")
    ap.add_argument("--routers", default="vllm,sglang")
    ap.add_argument("--instances", type=int, default=256)
    ap.add_argument("--prefill-share", type=float, default=0.25)
    ap.add_argument("--rates", default="50,100")
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--prompt-words", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--idle", type=float, default=15.0)
    ap.add_argument("--policy", default=None, help="both routers' --policy (default: theirs)")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    n_prefill = max(1, round(args.instances * args.prefill_share))
    first = 22000
    urls = [f"http://127.0.0.1:{first + i}" for i in range(args.instances)]
    prefills, decodes = urls[:n_prefill], urls[n_prefill:]
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        backend = Server(
            "backend",
            [sys.executable, "benchmarks/sim_openai_backend.py", "--port", str(first),
             "--count", str(args.instances)],
            {}, logs / "backend.log",
        )  # fmt: skip
        backend.start()
        try:
            backend.wait_for(BACKEND_READY, 120)
            for kind in args.routers.split(","):
                port = free_port()
                argv = router_argv(kind, args.router_venv, prefills, decodes, port, free_port(),
                                   args.policy)  # fmt: skip
                router = Server(f"{kind}-router", argv, {}, logs / f"{kind}.log")
                router.start()
                try:
                    url = f"http://127.0.0.1:{port}"
                    wait_serving(url, 600)
                    assert router.proc is not None
                    pid = router.proc.pid
                    idle = idle_cores(pid, args.idle)
                    log(f"{kind}-router idle: {idle:.3f} cores")
                    rows = []
                    for i, rate in enumerate(rates):
                        for max_tokens in (1, args.max_tokens):
                            row = measure(url, pid, rate, args, max_tokens, i, idle)
                            row["idle_cores"] = idle
                            log(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                            for k, v in row.items()}))  # fmt: skip
                            rows.append(row)
                    results[kind] = rows
                finally:
                    router.stop(grace_s=30)
        finally:
            backend.stop(grace_s=30)
    report(args, n_prefill, results)
    return 0


def report(
    args: argparse.Namespace, n_prefill: int, results: dict[str, list[dict[str, Any]]]
) -> None:
    info = host_info()
    print(f"## Rust routers in PD mode: {n_prefill} prefill + {args.instances - n_prefill} decode "
          "simulated engines\n")  # fmt: skip
    print(f"Host: {info.get('cpu', '?')}, {info.get('cores', '?')} cores; load average "
          f"{load_avg()}; policy {args.policy or 'each router default'}; prompts of "
          f"{args.prompt_words} words; {args.duration:.0f} s per point.\n")  # fmt: skip
    print("| router | rate (req/s) | max_tokens | sent | ok | CPU-s / 1k req (net) | "
          "TTFT p50 (ms) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for kind, rows in results.items():
        for r in rows:
            print(f"| {kind} | {r['rate']:.0f} | {r['max_tokens']} | {r['sent']} | {r['ok']} | "
                  f"{r['cpu_s_per_1k']:.3f} ({r['net_cpu_s_per_1k']:.3f}) | "
                  f"{r['ttft_p50_ms']:.1f} |")  # fmt: skip
    print()
    for kind, rows in results.items():
        for rate, net, per_100k_tokens, _ in per_rate_costs(rows):
            print(f"- {kind} at {rate:.0f} req/s: {net:.3f} net CPU-s per 1,000 requests alone; "
                  f"{per_100k_tokens:.2f} CPU-s per 100,000 streamed tokens")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
