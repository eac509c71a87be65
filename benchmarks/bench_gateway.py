"""Gateway overhead and latency-predictor accuracy, with real vLLM workers.

    .venv/bin/python benchmarks/bench_gateway.py --model-dir DIR [--requests 40] [--mixed 60]
        [--dump trace.jsonl]

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
3. **Where the time goes** (`--dump PATH`): each mixed-load request's timeline, recorded in this
   process around the gateway's worker calls (`Tracer`; nothing in the gateway changes), as JSON
   lines: the prediction and its parts at decision time, arrival, Prefill rpc start/end and
   engine time, Decode call and every chunk. The report then adds medians: TTFT = gateway
   before the rpc + rpc overhead + engine time + gateway after; TPOT's first gap (the decode
   worker's hand-off) against its later steps; the engine-time model's own MAPE.

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
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from controlplane.config import (  # noqa: E402
    GatewayConfig,
    HttpConfig,
    RoutingConfig,
)
from controlplane.gateway import GatewayServer  # noqa: E402
from controlplane.instances.instance import Instance  # noqa: E402
from controlplane.instances.registry import InstanceRegistry  # noqa: E402
from controlplane.request import generation as generation_module  # noqa: E402
from controlplane.scheduling import Assign, Decision, RequestSnapshot  # noqa: E402
from controlplane.text.tokenizer import ModelTokenizer  # noqa: E402
from controlplane.workers import client as workers_module  # noqa: E402
from controlplane.workers.profiling import ProfileSettings  # noqa: E402
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


class Tracer:
    """Per-request timeline of the mixed load, recorded in this process by wrapping the gateway's
    worker calls (benchmark instrumentation only; nothing in the gateway changes). One JSON line
    per request: the prediction and the predictor's parts of it at decision time, and what was
    observed (arrival, Prefill rpc start/end and engine time, Decode call, every chunk)."""

    def __init__(self, registry: InstanceRegistry) -> None:
        self.enabled = False
        self.decisions: dict[int, dict[str, object]] = {}
        self.generations: list[generation_module.Generation] = []
        self.calls: dict[str, dict[str, object]] = {}
        self._keep: list[Assign] = []
        registry_decide = registry.decide

        def decide(request: RequestSnapshot) -> Decision:
            decision = registry_decide(request)
            if self.enabled and isinstance(decision, Assign):
                self._keep.append(decision)
                self.decisions[id(decision)] = self._parts(registry, request, decision)
            return decision

        registry.decide = decide  # type: ignore[method-assign]
        observe_ttft, observe_tpot = registry.observe_ttft, registry.observe_tpot
        self.observed: dict[int, dict[str, float]] = {}

        def ttft(assign: Assign, instance: Instance, observed_s: float) -> None:
            observe_ttft(assign, instance, observed_s)
            self.observed.setdefault(id(assign), {})["ttft_s"] = observed_s

        def tpot(assign: Assign, instance: Instance, observed_s: float) -> None:
            observe_tpot(assign, instance, observed_s)
            self.observed.setdefault(id(assign), {})["tpot_s"] = observed_s

        registry.observe_ttft = ttft  # type: ignore[method-assign]
        registry.observe_tpot = tpot  # type: ignore[method-assign]
        generation_init = generation_module.Generation.__init__
        tracer = self

        def init(self: generation_module.Generation, *args: object, **kwargs: object) -> None:
            generation_init(self, *args, **kwargs)  # type: ignore[arg-type]
            if tracer.enabled:
                tracer.generations.append(self)

        generation_module.Generation.__init__ = init  # type: ignore[method-assign]
        client_prefill = workers_module.WorkerClient.prefill
        client_decode = workers_module.WorkerClient.decode

        async def prefill(client: workers_module.WorkerClient, **kwargs: object) -> object:
            start = time.monotonic()
            result = await client_prefill(client, **kwargs)  # type: ignore[arg-type]
            if self.enabled:
                self.calls.setdefault(str(kwargs["request_id"]), {}).update(
                    prefill_start=start,
                    prefill_end=time.monotonic(),
                    engine_s=result.engine_time_s,
                    prefill_cached=result.num_cached_tokens,
                )
            return result

        async def decode(client: workers_module.WorkerClient, **kwargs: object) -> object:
            record = self.calls.setdefault(str(kwargs["request_id"]), {})
            record["decode_start"] = time.monotonic()
            chunks: list[tuple[float, int]] = []
            record["chunks"] = chunks
            async for chunk in client_decode(client, **kwargs):  # type: ignore[arg-type]
                chunks.append((time.monotonic(), len(chunk.token_ids)))
                record["decode_cached"] = chunk.num_cached_tokens
                record["external"] = chunk.num_external_tokens
                yield chunk

        workers_module.WorkerClient.prefill = prefill  # type: ignore[method-assign,assignment]
        workers_module.WorkerClient.decode = decode  # type: ignore[method-assign,assignment]

    @staticmethod
    def _parts(
        registry: InstanceRegistry, request: RequestSnapshot, assign: Assign
    ) -> dict[str, object]:
        parts: dict[str, object] = {"route": assign.route.value}
        decode = registry.get(assign.decode)
        load = decode.load()
        parts.update(
            batch=load.running_decodes,
            context=load.decode_context_tokens,
            step_s=decode.predictor.decode_step_s(
                load.running_decodes + 1, load.decode_context_tokens + request.num_prompt_tokens
            ),
        )
        if assign.prefill is not None:
            prefill = registry.get(assign.prefill)
            load_p = prefill.load()
            cached = assign.cached_blocks * request.block_size
            parts.update(
                queued_tokens=load_p.queued_prefill_tokens,
                queued_requests=load_p.queued_prefill_requests,
                queue_s=prefill.predictor.queue_s(
                    load_p.queued_prefill_tokens, load_p.queued_prefill_requests
                ),
                service_s=prefill.predictor.prefill_s(request.num_prompt_tokens - cached, cached),
            )
        return parts

    def dump(self, path: Path) -> None:
        with path.open("w") as out:
            for g in self.generations:
                req, assign = g.request, g.assign
                record: dict[str, object] = {
                    "prompt": len(req.prompt_token_ids),
                    "max_tokens": req.max_tokens,
                    "arrival": req.arrival_s,
                    "predicted_ttft_s": assign.predicted_ttft_s,
                    "predicted_tpot_s": assign.predicted_tpot_s,
                    "completion_tokens": g.num_completion_tokens,
                    **self.decisions.get(id(assign), {}),
                    **self.observed.get(id(assign), {}),
                    **self.calls.get(req.request_id, {}),
                }
                out.write(json.dumps(record) + "\n")


def breakdown(records: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: where the observed TTFT and TPOT go (medians over the traced requests),
    beside the predictor's parts; MAPE of the engine-time prefill model alone."""
    ttft_rows: list[tuple[float, ...]] = []
    tpot_rows: list[tuple[float, ...]] = []
    engine_errors: dict[bool, list[float]] = {False: [], True: []}
    for r in records:
        if "ttft_s" in r and "prefill_end" in r:
            pre = r["prefill_start"] - r["arrival"]
            rpc = r["prefill_end"] - r["prefill_start"] - r["engine_s"]
            post = r["ttft_s"] - (r["prefill_end"] - r["arrival"])
            ttft_rows.append(
                (r["ttft_s"], pre, rpc, r["engine_s"], post, r["predicted_ttft_s"],
                 r.get("queue_s", 0.0), r.get("service_s", 0.0))
            )  # fmt: skip
            concurrent = r.get("queued_requests", 0) > 0
            engine_errors[concurrent].append(abs(r["service_s"] / r["engine_s"] - 1.0))
        chunks = r.get("chunks") or []
        if "tpot_s" in r and len(chunks) >= 2 and "prefill_end" in r:
            first_gap = chunks[0][0] - r["prefill_end"]
            later = sum(n for _, n in chunks[1:])
            step = (chunks[-1][0] - chunks[0][0]) / later if later else 0.0
            tpot_rows.append(
                (r["tpot_s"], first_gap, step, r["predicted_tpot_s"], r.get("step_s", 0.0))
            )
    lines = []

    def med(rows: list[tuple[float, ...]], i: int) -> str:
        return f"{percentile([row[i] for row in rows], 0.5) * 1e3:.2f}" if rows else "n/a"

    names = "observed, gateway before rpc, rpc overhead, engine, gateway after"
    lines.append(f"TTFT medians (ms), {len(ttft_rows)} requests: {names} = " + ", ".join(
        med(ttft_rows, i) for i in range(5)) + "; predicted, queue part, service part = "
        + ", ".join(med(ttft_rows, i) for i in range(5, 8)))  # fmt: skip
    for concurrent, errors in engine_errors.items():
        if errors:
            lines.append(
                f"engine-time model MAPE ({'queue seen' if concurrent else 'no queue'}): "
                f"{sum(errors) / len(errors) * 100:.1f} % over {len(errors)}"
            )
    lines.append(
        f"TPOT medians (ms), {len(tpot_rows)} requests: observed, first gap (hand-off), later "
        "steps, predicted, predicted step = " + ", ".join(med(tpot_rows, i) for i in range(5))
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--requests", type=int, default=40, help="overhead pairs")
    parser.add_argument("--mixed", type=int, default=60, help="mixed-load requests")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument(
        "--dump", type=Path, default=None, help="write the mixed load's per-request trace (JSONL)"
    )
    args = parser.parse_args()
    model_dir = args.model_dir.resolve()
    tokenizer = ModelTokenizer.from_model_dir(model_dir)
    vocab = tokenizer.vocab_size
    rng = random.Random(0)

    store = start_store("--metadata", "embedded")
    metadata = store.metadata  # strata://: its gRPC metadata service
    common: tuple[str, ...] = ("--kv-metadata", metadata, "--max-num-seqs", "8")
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
            http=HttpConfig(port=0),
            routing=RoutingConfig(kv_metadata=metadata),
            profiling=ProfileSettings(max_model_len=args.max_model_len),
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
        tracer = Tracer(registry) if args.dump is not None else None
        if tracer is not None:
            tracer.enabled = True
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
        if tracer is not None and args.dump is not None:
            tracer.enabled = False
            tracer.dump(args.dump)
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
        if args.dump is not None:
            records = [json.loads(line) for line in args.dump.read_text().splitlines()]
            print()
            for line in breakdown(records):
                print(f"- {line}")
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
