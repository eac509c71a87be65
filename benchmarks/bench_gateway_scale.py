"""The real gateway before hundreds of SIMULATED workers: what it costs per request and per token.

    .venv/bin/python benchmarks/bench_gateway_scale.py --model-dir DIR [--instances 256]
        [--prefill-share 0.25] [--profile simulator/profiles/llama2-7b-h100.yaml]
        [--rates 50,100,150] [--duration 40] [--prompt-words 300] [--max-tokens 64]

Issue 13, acceptance 4. One run starts ``--instances`` simulated instances (`strata worker
--engine simulated`, simulator/worker.py: real gRPC, the cluster key, the profile's step times,
deterministic tokens; a quarter of them prefill by default, in two processes per role), one
gateway process (`python -m controlplane.gateway`, its defaults: policy, profiling, the model's
real tokenizer, block keys, the latency predictor) before all of them, and waits until every
instance is profiled and ready. Then, at each rate, an open-loop load of streaming completions
(Poisson arrivals, unique prompts of ``--prompt-words`` words) runs for ``--duration`` seconds,
twice: with ``max_tokens`` 1 (the request alone: HTTP, tokenization, hashing, prediction, the
decision, one Prefill call) and with ``--max-tokens`` (plus the Decode call and its stream). It
reports per rate and kind:

- the gateway process's CPU-seconds (user + system, every thread; psutil) per 1,000 requests,
  and, from the difference of the two kinds, per 100,000 streamed tokens;
- the scheduling decision's p50/p99 (the gateway's ``strata_gateway_scheduling_decision_seconds``
  histogram, interpolated within its buckets), and the client's TTFT p50/p99;
- requests answered, refused (429/503) and failed, and the rate achieved.

"Sustained" is the highest rate at which every request was answered at >= 95 % of the offered
rate; the CPU-bound projection is 1,000 / (CPU-s per 1,000 requests) requests/s per core. The
load generator and the simulated workers share this machine's cores with the gateway, which
the report prints beside the figures (their CPU-seconds too). Prints markdown on stdout.
``--gateway-profile FILE`` runs the gateway under cProfile (``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import Server, host_info, load_avg, log, percentile  # noqa: E402
from strata_common.credentials import load_or_create_cluster_key  # noqa: E402

WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week "
    "case point government company number group problem fact river stone cloud garden letter "
    "market window engine silver orange forest winter summer island bridge mountain question"
).split()
READY = re.compile(r"strata worker ready")
INSTANCE = re.compile(r"strata worker ready .* instance=(\S+)")
LISTENING = re.compile(r"strata gateway listening on (\S+)")
DECISION_METRIC = "strata_gateway_scheduling_decision_seconds"


def start_workers(
    args: argparse.Namespace, role: str, count: int, key_file: Path, logs: Path
) -> list[Server]:
    """``count`` simulated instances of ``role`` in two processes (one if ``count`` is 1)."""
    per = [count // 2 + count % 2, count // 2] if count > 1 else [count]
    servers = []
    for i, n in enumerate(p for p in per if p):
        argv = [sys.executable, "-m", "strata.cli", "worker", "--engine", "simulated"]
        argv += ["--role", role, "--model", str(args.model_dir), "--profile", str(args.profile)]
        argv += ["--instances", str(n), "--cluster-key-file", str(key_file)]
        server = Server(f"{role}-{i}", argv, {}, logs / f"{role}-{i}.log")
        servers.append(server)
        server.start()
        server.wait_for(READY, 120, count=n)
    return servers


def endpoints(servers: list[Server]) -> list[str]:
    found = []
    for server in servers:
        found += [m.group(1) for line in server.lines if (m := INSTANCE.search(line))]
    return found


def wait_ready(url: str, wanted: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as reply:
                workers = json.load(reply)["workers"]
            if sum(w["ready"] for w in workers) == wanted:
                return time.monotonic() - t0
        except (OSError, ValueError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"not every instance ready within {timeout_s:.0f} s")


def counter_sum(url: str, *names: str) -> float:
    """The sum of every series of the counters ``names`` on ``url``/metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    pattern = "|".join(re.escape(n) for n in names)
    return sum(
        float(m.group(1)) for m in re.finditer(rf"^(?:{pattern})(?:{{[^}}]*}})? (\S+)$", text, re.M)
    )


def wait_profiled(url: str, wanted: int, timeout_s: float) -> float:
    """Wait until the gateway's start-up profile of every instance ended (calibrated or
    rejected): the profiles' calls are work the measurement must not include."""
    t0 = time.monotonic()
    names = ("strata_gateway_profiled_instances_total", "strata_gateway_profiles_rejected_total")
    while (done := counter_sum(url, *names)) < wanted:
        if time.monotonic() - t0 > timeout_s:  # some failed or were cancelled: go on
            log(f"only {done:.0f} of {wanted} start-up profiles ended in {timeout_s:.0f} s")
            break
        time.sleep(1.0)
    return time.monotonic() - t0


def histogram(url: str, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a Prometheus histogram on ``url``/metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    rows = []
    for m in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M):
        rows.append((float(m.group(1)), float(m.group(2))))
    return rows


def quantile(
    before: list[tuple[float, float]], after: list[tuple[float, float]], q: float
) -> float:
    """The ``q`` quantile of the observations between two snapshots (linear within a bucket)."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = counts[-1][1]
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for le, cum in counts:
        if cum >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(cum - below, 1e-12)
        lower, below = le, cum
    return lower


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def idle_cores(pid: int, seconds: float) -> float:
    """Cores the process ``pid`` uses over ``seconds`` of no requests (health checks, timers)."""
    cpu0, t0 = cpu_s([pid]), time.perf_counter()
    time.sleep(seconds)
    return (cpu_s([pid]) - cpu0) / (time.perf_counter() - t0)


def per_rate_costs(rows: list[dict[str, Any]]) -> list[tuple[float, float, float, float]]:
    """``(rate, net CPU-s per 1,000 requests alone, CPU-s per 100,000 streamed tokens, tokens
    per request beyond the first)`` for each rate measured with ``max_tokens`` 1 and more: the
    tokens' cost is the difference of the two, per token beyond the first."""
    costs = []
    for rate in sorted({r["rate"] for r in rows}):
        short = next(r for r in rows if r["rate"] == rate and r["max_tokens"] == 1)
        long = next(r for r in rows if r["rate"] == rate and r["max_tokens"] != 1)
        extra = long["tokens"] / max(1, long["ok"]) - 1
        per_token = (long["net_cpu_s_per_1k"] - short["net_cpu_s_per_1k"]) / 1000 / max(extra, 1)
        costs.append((rate, short["net_cpu_s_per_1k"], 100_000 * per_token, extra))
    return costs


@dataclass
class Outcome:
    status: int = 0
    ttft_s: float | None = None
    tokens: int = 0
    error: str = ""


async def one_request(
    session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int
) -> Outcome:
    body = {"model": "sim", "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    out = Outcome()
    t0 = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=body) as reply:
            out.status = reply.status
            if reply.status != 200:
                await reply.read()
                return out
            async for raw in reply.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    if out.ttft_s is None:
                        out.ttft_s = time.perf_counter() - t0
                    out.tokens += 1
    except (TimeoutError, aiohttp.ClientError) as exc:
        out.error = repr(exc)
    return out


async def run_load(
    url: str, rate: float, duration_s: float, words: int, max_tokens: int, seed: int
) -> list[Outcome]:
    rng = random.Random(seed)
    tasks: list[asyncio.Task[Outcome]] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        at = 0.0
        i = 0
        while at < duration_s:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            prompt = f"{seed}-{i} " + " ".join(rng.choice(WORDS) for _ in range(words))
            tasks.append(asyncio.create_task(one_request(session, url, prompt, max_tokens)))
            i += 1
            at += rng.expovariate(rate)
        return list(await asyncio.gather(*tasks))


def measure(
    url: str, gateway_pid: int, other_pids: list[int], rate: float, args: argparse.Namespace,
    max_tokens: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    hist0 = histogram(url, DECISION_METRIC)
    cpu0, other0 = cpu_s([gateway_pid]), cpu_s(other_pids)
    t0 = time.perf_counter()
    outcomes = asyncio.run(run_load(url, rate, args.duration, args.prompt_words, max_tokens, seed))
    wall = time.perf_counter() - t0
    cpu, other = cpu_s([gateway_pid]) - cpu0, cpu_s(other_pids) - other0
    hist1 = histogram(url, DECISION_METRIC)
    ok = [o for o in outcomes if o.status == 200 and not o.error]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    tokens = sum(o.tokens for o in ok)
    return {
        "rate": rate,
        "max_tokens": max_tokens,
        "sent": len(outcomes),
        "ok": len(ok),
        "refused": sum(o.status in (429, 503) for o in outcomes),
        "failed": sum(bool(o.error) or o.status not in (200, 429, 503) for o in outcomes),
        "achieved_rps": len(ok) / args.duration,
        "tokens": tokens,
        "wall_s": wall,
        "gateway_cpu_s": cpu,
        "others_cpu_s": other,
        "cpu_s_per_1k": 1000 * cpu / max(1, len(ok)),
        "decision_p50_us": 1e6 * quantile(hist0, hist1, 0.5),
        "decision_p99_us": 1e6 * quantile(hist0, hist1, 0.99),
        "ttft_p50_ms": 1e3 * percentile(ttfts, 50) if ttfts else float("nan"),
        "ttft_p99_ms": 1e3 * percentile(ttfts, 99) if ttfts else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--instances", type=int, default=256)
    parser.add_argument("--prefill-share", type=float, default=0.25)
    parser.add_argument(
        "--profile", type=Path, default=REPO_ROOT / "simulator/profiles/llama2-7b-h100.yaml"
    )
    parser.add_argument("--rates", default="50,100,150")
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--prompt-words", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measured")
    parser.add_argument(
        "--gateway-profile",
        type=Path,
        default=None,
        help="run the gateway under cProfile and write its stats here (where the CPU goes)",
    )
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    n_prefill = max(1, round(args.instances * args.prefill_share))
    n_decode = args.instances - n_prefill
    started: list[Server] = []
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        key_file = logs / "cluster.key"
        load_or_create_cluster_key(key_file)
        try:
            log(f"starting {n_prefill} prefill + {n_decode} decode simulated instances")
            prefills = start_workers(args, "prefill", n_prefill, key_file, logs)
            started += prefills
            decodes = start_workers(args, "decode", n_decode, key_file, logs)
            started += decodes
            argv = [sys.executable]
            if args.gateway_profile is not None:  # cProfile writes it when the gateway exits
                argv += ["-m", "cProfile", "-o", str(args.gateway_profile.resolve())]
            argv += ["-m", "controlplane.gateway", "--model-dir", str(args.model_dir)]
            argv += ["--served-model-name", "sim", "--port", "0"]
            argv += ["--cluster-key-file", str(key_file)]
            argv += ["--prefill", ",".join(endpoints(prefills))]
            argv += ["--decode", ",".join(endpoints(decodes))]
            gateway = Server("gateway", argv, {}, logs / "gateway.log")
            started.append(gateway)
            gateway.start()
            match = LISTENING.search(gateway.wait_for(LISTENING, 300)[0])
            assert match is not None and gateway.proc is not None
            url, gateway_pid = match.group(1), gateway.proc.pid
            ready_s = wait_ready(url, args.instances, 900)
            ready_s += wait_profiled(url, args.instances, 300)
            log(f"gateway {url}: {args.instances} instances ready, profiled after {ready_s:.0f} s")
            others = [s.proc.pid for s in prefills + decodes if s.proc is not None]
            # Idle, the gateway still health-checks every instance: its CPU without requests.
            idle = idle_cores(gateway_pid, args.idle)
            log(f"idle gateway: {idle:.3f} cores")
            rows = []
            for i, rate in enumerate(rates):
                for max_tokens in (1, args.max_tokens):
                    row = measure(url, gateway_pid, others, rate, args, max_tokens, i)
                    net = row["gateway_cpu_s"] - idle * row["wall_s"]
                    row["net_cpu_s_per_1k"] = 1000 * net / max(1, row["ok"])
                    shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
                    log(json.dumps(shown))
                    rows.append(row)
        finally:
            for server in reversed(started):  # the gateway first: it stops calling them
                server.stop(grace_s=300 if args.gateway_profile is not None else 60)
    report(args, n_prefill, n_decode, ready_s, idle, rows)
    return 0


def report(
    args: argparse.Namespace, n_prefill: int, n_decode: int, ready_s: float, idle: float,
    rows: list[dict[str, Any]],
) -> None:  # fmt: skip
    info = host_info()
    print(f"## Gateway at scale: {n_prefill} prefill + {n_decode} decode simulated instances\n")
    print(
        f"Host: {info.get('cpu', '?')}, {info.get('cores', '?')} cores; load average "
        f"{load_avg()}. Profile {args.profile.name}; prompts of {args.prompt_words} words; "
        f"{args.duration:.0f} s per point; every instance ready and profiled "
        f"{ready_s:.0f} s after start. Idle (health checks of every instance), the gateway "
        f'uses {idle:.3f} cores; "net" figures subtract that.\n'
    )
    print(
        "| rate (req/s) | max_tokens | sent | ok | refused | failed | achieved (req/s) | "
        "gateway CPU-s / 1k req (net) | decision p50 / p99 (us) | TTFT p50 / p99 (ms) | "
        "workers' CPU-s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['rate']:.0f} | {r['max_tokens']} | {r['sent']} | {r['ok']} | {r['refused']} | "
            f"{r['failed']} | {r['achieved_rps']:.1f} | {r['cpu_s_per_1k']:.3f} "
            f"({r['net_cpu_s_per_1k']:.3f}) | "
            f"{r['decision_p50_us']:.0f} / {r['decision_p99_us']:.0f} | "
            f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | {r['others_cpu_s']:.1f} |"
        )
    print()
    for rate, net, per_100k_tokens, extra_tokens in per_rate_costs(rows):
        print(
            f"- {rate:.0f} req/s: {net:.3f} net CPU-s per 1,000 requests alone "
            f"(-> {1000 / max(net, 1e-9):.0f} req/s per core); "
            f"{per_100k_tokens:.2f} CPU-s per 100,000 streamed tokens (the decode call and "
            f"its {extra_tokens:.0f} more tokens per request)"
        )
    sustained = [
        r["rate"] for r in rows
        if r["ok"] == r["sent"] and r["achieved_rps"] >= 0.95 * r["rate"]
    ]  # fmt: skip
    print(f"- sustained here (every request answered, >= 95 % of the offered rate): "
          f"{max(sustained) if sustained else 0:.0f} req/s")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
