"""Replay a Mooncake-format trace against a live OpenAI-compatible server; report goodput.

    .venv/bin/python loadtests/replay_trace.py --url http://127.0.0.1:8000 \\
        --trace ../shared/traces/conversation_trace.jsonl --num-requests 200 --rate 2 \\
        --block-tokens 16 --slo-ttft-ms 2000 --slo-tpot-ms 200 --out replay.json

Open loop: request i is sent at its trace arrival time, scaled (``--rate`` requests per second
on average, or ``--time-scale``), whatever the server's state. Each of the trace's 512-token
``hash_ids`` becomes ``--block-tokens`` deterministic token ids (seeded by the id), so requests
that share ids share a real token prefix — what prefix caches and the KV pool can reuse; the
prompt is those blocks, cut to the trace's input length scaled the same way, then completed with
tokens seeded by the request (a CPU model cannot serve 12k-token prompts: this keeps the prefix
structure and the arrival pattern at a size it can). Output lengths are the trace's, capped by
``--max-output-tokens``, with ``ignore_eos`` so that each request generates them.

Each request is a streaming ``/v1/completions`` call with a token-id prompt. Reported (stdout,
and ``--out`` as JSON): requests, successes, statuses, SLO attainment (met both SLOs over all
requests), goodput (requests within SLOs per second of the replay), TTFT and TPOT percentiles,
and the share of prompt tokens the server reports as cached
(``usage.prompt_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from simulator.results import percentile
from simulator.trace import ReplayScale, TraceRequest, load_trace


@dataclass(slots=True)
class Outcome:
    index: int
    sent_s: float
    status: int = 0
    error: str = ""
    ttft_s: float | None = None
    tpot_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def met(self, ttft_slo_s: float, tpot_slo_s: float) -> bool:
        if self.status != 200 or self.error or self.ttft_s is None:
            return False
        return self.ttft_s <= ttft_slo_s and (self.tpot_s is None or self.tpot_s <= tpot_slo_s)


def block_tokens(hash_id: int, count: int, low: int, high: int) -> list[int]:
    """The ``count`` token ids that stand for trace block ``hash_id`` (always the same)."""
    rng = random.Random(hash_id)
    return [rng.randrange(low, high) for _ in range(count)]


def prompt_ids(
    index: int, request: TraceRequest, scale: ReplayScale, low: int, high: int
) -> list[int]:
    """The request's prompt: its whole trace blocks' tokens, then tokens of its own, to the
    scaled length (``scale``; the simulator scales a trace the same way)."""
    length = scale.input_tokens(request.input_tokens)
    ids: list[int] = []
    for hash_id in request.hash_ids[: scale.whole_blocks(request)]:
        ids += block_tokens(hash_id, scale.block_tokens, low, high)
    own = random.Random(f"request-{index}")
    ids += [own.randrange(low, high) for _ in range(length - len(ids))]
    return ids


async def send(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    outcome: Outcome,
    headers: dict[str, str],
    due: float,
) -> None:
    """One request; its TTFT counts from ``due`` (its scheduled arrival, monotonic clock), so
    that a client running late does not hide the server's queueing."""
    start = due
    first: float | None = None
    last: float | None = None
    chunks = 0
    try:
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
            outcome.status = resp.status
            if resp.status != 200:
                outcome.error = (await resp.text())[:200]
                return
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    outcome.error = str(event["error"])[:200]
                    return
                choices = event.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("token_ids")):
                    now = time.monotonic()
                    first = now if first is None else first
                    last = now
                    chunks += 1
                usage = event.get("usage")
                if usage:
                    outcome.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    outcome.output_tokens = int(usage.get("completion_tokens", 0))
                    details = usage.get("prompt_tokens_details") or {}
                    outcome.cached_tokens = int(details.get("cached_tokens") or 0)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"[:200]
        return
    if first is None:
        outcome.error = outcome.error or "no token"
        return
    outcome.ttft_s = first - start
    tokens = outcome.output_tokens or chunks
    if tokens > 1 and last is not None:
        outcome.tpot_s = (last - first) / (tokens - 1)


def report(
    outcomes: list[Outcome],
    span_s: float,
    ttft_slo_s: float,
    tpot_slo_s: float,
    replay_s: float | None = None,
) -> dict[str, Any]:
    """``span_s``: from the first arrival to the last (goodput's denominator, as the
    simulator's); ``replay_s``: the whole replay, the last answers included. Percentiles as the
    simulator computes them (simulator/results.py)."""
    ok = [o for o in outcomes if o.status == 200 and not o.error]
    met = sum(o.met(ttft_slo_s, tpot_slo_s) for o in outcomes)
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    tpots = [o.tpot_s for o in ok if o.tpot_s is not None]
    prompt = sum(o.prompt_tokens for o in ok)

    def ms(values: list[float], q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value * 1e3, 2)

    return {
        "requests": len(outcomes),
        "succeeded": len(ok),
        "statuses": dict(Counter(str(o.status) for o in outcomes)),
        "slo": {"ttft_ms": ttft_slo_s * 1e3, "tpot_ms": tpot_slo_s * 1e3},
        "slo_attainment": round(met / len(outcomes), 4),
        "goodput_rps": round(met / span_s, 4) if span_s > 0 else None,
        "arrival_span_s": round(span_s, 2),
        "replay_s": round(replay_s if replay_s is not None else span_s, 2),
        "ttft_ms": {f"p{q}": ms(ttfts, q) for q in (50, 90, 99)},
        "tpot_ms": {f"p{q}": ms(tpots, q) for q in (50, 90, 99)},
        "cached_token_share": round(sum(o.cached_tokens for o in ok) / prompt, 4) if prompt else 0,
        "errors": Counter(o.error.split(":")[0] for o in outcomes if o.error).most_common(5),
    }


async def replay(args: argparse.Namespace) -> dict[str, Any]:
    try:
        trace = load_trace(args.trace, limit=args.num_requests)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if args.rate:
        requests = trace.at_rate(args.rate)
        scale = args.rate / trace.native_rate if trace.native_rate != float("inf") else 1.0
    else:
        scale = args.time_scale
        start_s = trace.requests[0].arrival_s
        requests = tuple(
            dataclasses.replace(r, arrival_s=(r.arrival_s - start_s) / scale)
            for r in trace.requests
        )
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.slo_headers:  # Strata's admission then judges each request by these SLOs
        headers["x-strata-ttft-slo-ms"] = f"{args.slo_ttft_ms:g}"
        headers["x-strata-tpot-slo-ms"] = f"{args.slo_tpot_ms:g}"
    scale_to = ReplayScale(args.block_tokens, args.max_output_tokens)
    outcomes: list[Outcome] = []
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    connector = aiohttp.TCPConnector(limit=args.max_connections)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        clock0 = time.monotonic()
        tasks = []
        for request in requests:
            index = request.index  # the trace's (what the simulator's records are keyed by)
            delay = request.arrival_s - (time.monotonic() - clock0)
            if delay > 0:
                await asyncio.sleep(delay)
            body = {
                "model": args.model,
                "prompt": prompt_ids(index, request, scale_to, args.token_low, args.token_high),
                "max_tokens": scale_to.output_tokens(request.output_tokens),
                "temperature": 0.0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }  # fmt: skip
            outcome = Outcome(index, time.monotonic() - clock0)
            outcomes.append(outcome)
            due = clock0 + request.arrival_s
            task = send(session, args.url, body, outcome, headers, due)
            tasks.append(asyncio.create_task(task))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - clock0
    span = requests[-1].arrival_s - requests[0].arrival_s if requests else 0.0
    result = report(
        outcomes, span, args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3, replay_s=elapsed
    )
    result["trace"] = str(args.trace)
    result["time_scale"] = round(scale, 4)
    result["block_tokens"] = args.block_tokens
    if args.per_request:
        result["per_request"] = [asdict(o) for o in outcomes]
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="", help="the served model name (default: the first)")
    parser.add_argument("--trace", type=Path, required=True)
    parser.add_argument("--num-requests", type=int, default=0, help="the first N (0: all)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, default=0.0, help="mean requests/s to replay at")
    pace.add_argument("--time-scale", type=float, default=1.0, help="trace time / replay time")
    parser.add_argument("--block-tokens", type=int, default=16,
                        help="tokens per 512-token trace block")  # fmt: skip
    parser.add_argument("--max-output-tokens", type=int, default=64)
    parser.add_argument("--token-low", type=int, default=100, help="lowest token id used")
    parser.add_argument("--token-high", type=int, default=1100, help="one past the highest")
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=200.0)
    parser.add_argument("--api-key", default="")
    parser.add_argument(
        "--slo-headers",
        action="store_true",
        help="send the SLOs as Strata's x-strata-*-slo-ms headers (its admission uses them)",
    )
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--max-connections", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    parser.add_argument("--per-request", action="store_true", help="every request in the JSON")
    args = parser.parse_args(argv)
    if args.rate < 0 or args.time_scale <= 0 or args.block_tokens < 1:
        parser.error("--rate must be >= 0, --time-scale and --block-tokens > 0")
    if args.max_output_tokens < 1:
        parser.error("--max-output-tokens must be >= 1")
    if not 0 <= args.token_low < args.token_high:
        parser.error("need 0 <= --token-low < --token-high")
    return args


async def _model(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/models") as resp:
        data = await resp.json()
    return str(data["data"][0]["id"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.model:
        args.model = asyncio.run(_model(args.url))
    result = asyncio.run(replay(args))
    summary = {k: v for k, v in result.items() if k != "per_request"}
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
