"""Cross-host KV: bandwidth and the transfer's share of a request's time, unshaped and with the
link held to 1 Gbit/s, each beside a raw TCP socket over the same link in the same run.

    .venv/bin/python benchmarks/bench_multihost.py [--model DIR] [--lengths 1000,4000]
        [--repeats 3] [--mbit 1000]

Needs root and iproute2 (network namespaces, tests/netns.py). The deployment is the multi-host
test's (tests/e2e/multihost_cluster.py): Valkey; a gateway; a store node and a prefill worker on
host A; a store node and a decode worker on host B; a client host; TLS everywhere, the cluster
key file, API keys. For each link setting (unshaped, then `tc tbf` at ``--mbit`` on both A's and
B's links):

1. **raw socket**: 64 MiB from A to B over one TCP connection (the link's limit), 3 runs;
2. **KV read-through**: 64 blocks of 1 MiB stored on A's node, read from host B through B's node
   (which reads what it lacks from A's over TLS), 3 runs with fresh blocks;
3. **serving**: prompts of each length in ``--lengths`` (salted, nothing reused; one warm-up),
   streamed greedy completions of 4 tokens. The prefill on A saves the prompt's blocks in A's
   node; its first token is the request's first token (TTFT). The decode on B then loads the
   blocks through B's node from A's: that transfer lies between the first and the second token.
   Reported: TTFT, time to the second token, the decode worker's KV load time for the request
   (its Stats rpc before and after), and that load's share of the time to the second token.

Prints a markdown report to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_serving import build_prompts
from benchmarks.harness import host_info, load_avg, log
from tests.e2e.multihost_cluster import Deployment, deploy
from tests.netns import unavailable

DEFAULT_MODEL = Path.home() / ".cache/strata/models/SmolLM2-135M-Instruct"
RAW_BYTES = 64 << 20
KV_BLOCKS, KV_BLOCK_BYTES = 64, 1 << 20
RUNS = 3


def mbit_s(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / seconds / 1e6


def measure_link(d: Deployment, seed: int) -> dict[str, list[float]]:
    raw = [mbit_s(*d.raw_bandwidth("a", "b", RAW_BYTES)) for _ in range(RUNS)]
    kv = [
        mbit_s(*d.kv_bandwidth(seed=seed * 100 + run, count=KV_BLOCKS, size=KV_BLOCK_BYTES))
        for run in range(RUNS)
    ]
    return {"raw": raw, "kv": kv}


def measure_serving(
    d: Deployment, model: Path, lengths: list[int], repeats: int
) -> dict[int, list[dict[str, float]]]:
    prompts = build_prompts(
        model, lengths, num_warmup=1, num_repeats=repeats, api="completions", warm=False
    )
    samples: dict[int, list[dict[str, float]]] = {n: [] for n in lengths}
    for prompt in prompts:
        before = d.worker_stats("b")
        token_s = d.stream(prompt.text, 4)
        after = d.worker_stats("b")
        if prompt.warmup:
            continue
        load_s = after.get("kv_load_time_s", 0.0) - before.get("kv_load_time_s", 0.0)
        loaded = int(after.get("kv_bytes_loaded", 0)) - int(before.get("kv_bytes_loaded", 0))
        samples[int(prompt.case)].append(
            {"ttft": token_s[0], "second": token_s[1], "load": load_s, "bytes": loaded}
        )
        log(f"{prompt.case} tokens: ttft {token_s[0] * 1e3:.0f} ms, load {load_s * 1e3:.1f} ms")
    return samples


def render(results: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    info = host_info()
    lines = [
        f"Host: {info['cpu']}, {info['cores']} cores; load average {load_avg()}; "
        f"model {args.model.name}; {time.strftime('%Y-%m-%d')}.",
        "",
        "| link | raw socket A→B (Mbit/s) | KV read-through B←A (Mbit/s) | KV / raw |",
        "|---|---|---|---|",
    ]
    for link, r in results:
        raw, kv = statistics.median(r["link"]["raw"]), statistics.median(r["link"]["kv"])
        spread = lambda v: f"{min(v):.0f}–{max(v):.0f}"  # noqa: E731
        lines.append(
            f"| {link} | {raw:.0f} ({spread(r['link']['raw'])}) | {kv:.0f} "
            f"({spread(r['link']['kv'])}) | {kv / raw:.0%} |"
        )
    lines += [
        "",
        "| link | prompt tokens | KV moved | TTFT p50 (ms) | 2nd token p50 (ms) | "
        "decode KV load p50 (ms) | load / time to 2nd token |",
        "|---|---|---|---|---|---|---|",
    ]
    for link, r in results:
        for length, samples in r["serving"].items():
            if not samples:
                continue
            med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
            lines.append(
                f"| {link} | {length} | {med['bytes'] / 2**20:.1f} MiB | {med['ttft'] * 1e3:.0f} "
                f"| {med['second'] * 1e3:.0f} | {med['load'] * 1e3:.1f} "
                f"| {med['load'] / med['second']:.1%} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--lengths", default="1000,4000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mbit", type=float, default=1000.0)
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason is not None:
        print(f"bench_multihost: {reason}", file=sys.stderr)
        return 2
    lengths = [int(n) for n in args.lengths.split(",")]
    max_len = str(max(lengths) + 512)
    results: list[tuple[str, dict[str, Any]]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-multihost-") as work,
        deploy(args.model, Path(work), worker_args=("--max-model-len", max_len)) as d,
    ):
        for seed, mbit in ((1, None), (2, args.mbit)):
            link = "unshaped" if mbit is None else f"tbf {mbit:g} Mbit/s"
            if mbit is not None:
                d.net.shape("a", mbit=mbit)
                d.net.shape("b", mbit=mbit)
            log(f"{link}: link")
            measured = {"link": measure_link(d, seed)}
            log(f"{link}: serving")
            measured["serving"] = measure_serving(d, args.model, lengths, args.repeats)
            results.append((link, measured))
    print(render(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
