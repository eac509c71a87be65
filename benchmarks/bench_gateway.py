"""Gateway overhead and latency-predictor accuracy, with real vLLM workers.

    .venv/bin/python benchmarks/bench_gateway.py --model-dir DIR [--requests 40] [--mixed 60]

One run starts a store node (embedded metadata served as strata://), one prefill and one decode
worker (`python -m dataplane.worker`) and a gateway in this process (policy slo_aware, profiling
on), waits for both workers' start-up profiles, then measures:

1. **Gateway overhead.** Unique prompts (nothing cached), `max_tokens` 1, one at a time: the
   request through the gateway (HTTP, validation, tokenization, block keys + prefix index + the
   policy's decision, the Prefill rpc, the response) against the same prompt's Prefill rpc sent
   straight to the prefill worker (the floor: what the gateway adds to). Calls alternate (direct,
   gateway, ...) so drift hits both. Reports p50/p99 of each and of the per-pair difference.
2. **Predictor accuracy.** A mixed load: prompt lengths drawn from 16 .. max_model_len/2,
   `max_tokens` 4 .. 64, 4 concurrent clients, streaming; the gateway scores each request's TTFT
   and mean TPOT against its Assign's predictions (registry PredictionAccuracy): MAPE, and the
   same over the second half only (after online refits).

Prints a markdown report on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from controlplane.config import GatewayConfig  # noqa: E402
from controlplane.gateway import GatewayServer  # noqa: E402
from controlplane.tokenizer import ModelTokenizer  # noqa: E402
from strata_proto import worker_pb2  # noqa: E402
from tests.e2e.dataplane_processes import start_store, start_worker, stub  # noqa: E402
from tests.integration.controlplane.conftest import LoopThread  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def post(url: str, body: dict[str, object]) -> tuple[int, float, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=600)
    start = time.perf_counter()
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        data = response.read()
        return response.status, time.perf_counter() - start, data
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--requests", type=int, default=40, help="overhead pairs")
    parser.add_argument("--mixed", type=int, default=60, help="mixed-load requests")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--max-model-len", type=int, default=1024)
    args = parser.parse_args()
    model_dir = args.model_dir.resolve()
    tokenizer = ModelTokenizer.from_model_dir(model_dir)
    vocab = tokenizer.vocab_size
    rng = random.Random(0)

    store = start_store("--metadata", "embedded")
    metadata = f"strata://{store.endpoint}"
    common = ("--kv-metadata", metadata, "--max-num-seqs", "8")
    common += ("--max-model-len", str(args.max_model_len))
    workers = []
    loop = LoopThread()
    server = None
    try:
        log("starting workers ...")
        for role in ("prefill", "decode"):
            workers.append(start_worker(model_dir, role, store.endpoint, *common))
        config = GatewayConfig(
            model_dir=model_dir,
            served_model_name="bench",
            prefill_endpoints=(workers[0].endpoint,),
            decode_endpoints=(workers[1].endpoint,),
            port=0,
            kv_metadata=metadata,
            profile_max_model_len=args.max_model_len,
        )
        server = GatewayServer(config, tokenizer=tokenizer)
        url = loop.run(server.start(), timeout_s=600)
        registry = server.registry
        started = time.monotonic()
        while registry.stats().extra["profiles_run"] < 2:
            if time.monotonic() - started > 600:
                raise RuntimeError("profiles did not finish")
            time.sleep(0.5)
        log(f"profiles done in {time.monotonic() - started:.1f} s")

        # 1. overhead
        prefill_rpc = stub(workers[0].endpoint)
        direct: list[float] = []
        through: list[float] = []
        for i in range(args.requests + 3):
            prompts = [
                [rng.randrange(10, vocab) for _ in range(args.prompt_tokens)] for _ in range(2)
            ]
            request = worker_pb2.PrefillRequest(
                request_id=uuid.uuid4().hex,
                prompt_token_ids=prompts[0],
                sampling=worker_pb2.SamplingParams(max_tokens=1, temperature=0.0),
            )
            start = time.perf_counter()
            prefill_rpc.Prefill(request, timeout=300)
            direct_s = time.perf_counter() - start
            body = {"model": "bench", "prompt": prompts[1], "max_tokens": 1, "temperature": 0}
            status, gateway_s, raw = post(url, body)
            if status != 200:
                raise RuntimeError(f"gateway answered {status}: {raw[:200]!r}")
            if i >= 3:  # warm-up pairs left out
                direct.append(direct_s)
                through.append(gateway_s)
        diffs = [g - d for g, d in zip(through, direct, strict=True)]

        # 2. mixed load
        accuracy_before = (registry.accuracy.num_ttft, registry.accuracy.num_tpot)

        def one(seed: int) -> tuple[int, float]:
            local = random.Random(seed)
            length = local.randrange(16, args.max_model_len // 2)
            max_tokens = local.randrange(4, 65)
            prompt = [local.randrange(10, vocab) for _ in range(length)]
            body = {
                "model": "bench",
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            status, seconds, _ = post(url, body)
            return status, seconds

        half = args.mixed // 2
        with ThreadPoolExecutor(4) as pool:
            first = list(pool.map(one, range(half)))
        accuracy = registry.accuracy
        half_figures = (
            accuracy.ttft_mape,
            accuracy.num_ttft,
            accuracy.tpot_mape,
            accuracy.num_tpot,
        )
        with ThreadPoolExecutor(4) as pool:
            second = list(pool.map(one, range(half, args.mixed)))
        statuses = [s for s, _ in first + second]
        stats = registry.stats()
        # MAPE over the second half alone, from the running means (the window holds 1000).
        ttft_second = _later_mean(half_figures[0], half_figures[1], accuracy.ttft_mape,
                                  accuracy.num_ttft)  # fmt: skip
        tpot_second = _later_mean(half_figures[2], half_figures[3], accuracy.tpot_mape,
                                  accuracy.num_tpot)  # fmt: skip

        print(f"## Gateway overhead and predictor accuracy ({model_dir.name})\n")
        print(
            f"`benchmarks/bench_gateway.py --model-dir {model_dir.name} --requests "
            f"{args.requests} --mixed {args.mixed}`; 1 prefill + 1 decode worker (vLLM CPU, "
            f"max_model_len {args.max_model_len}), gateway in-process, slo_aware, profiles on.\n"
        )
        print("| figure | p50 | p99 |\n|---|---|---|")
        for name, values in (
            (f"direct Prefill rpc, {args.prompt_tokens} tokens (the floor)", direct),
            ("through the gateway, max_tokens 1", through),
            ("gateway overhead (pairwise difference)", diffs),
        ):
            p50, p99 = percentile(values, 0.5) * 1e3, percentile(values, 0.99) * 1e3
            print(f"| {name} | {p50:.2f} ms | {p99:.2f} ms |")
        print()
        print(
            f"Mixed load: {args.mixed} requests, statuses {sorted(set(statuses))}, "
            f"{accuracy_before} samples before.\n"
        )
        print("| MAPE | TTFT | TPOT |\n|---|---|---|")
        print(f"| first half | {_pct(half_figures[0])} | {_pct(half_figures[2])} |")
        print(f"| second half only | {_pct(ttft_second)} | {_pct(tpot_second)} |")
        print(f"| whole run (gauge) | {_pct(stats.predictor_ttft_mape)} | "
              f"{_pct(stats.predictor_tpot_mape)} |")  # fmt: skip
    finally:
        if server is not None:
            loop.run(server.stop(), timeout_s=60)
        loop.close()
        for worker in workers:
            worker.stop()
        store.stop()
    return 0


def _later_mean(
    mean_before: float | None, count_before: int, mean_all: float | None, count_all: int
) -> float | None:
    if mean_all is None or count_all <= count_before:
        return None
    total_before = (mean_before or 0.0) * count_before
    return (mean_all * count_all - total_before) / (count_all - count_before)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


if __name__ == "__main__":
    sys.exit(main())
