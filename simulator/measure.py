"""``strata profile``: time real engines behind running workers and write the simulator's profile.

    strata profile --worker HOST:PORT [--worker HOST:PORT] --model-dir DIR --out FILE.yaml
                   [--cluster-key-file F] [--max-model-len N] [--max-batch B] [--repeats R] ...

The workers are ``strata worker`` processes (the engines of ``strata serve``, say) with no client
traffic: a prefill (or ``both``) worker times prompts alone in a step (the Prefill rpc's
``engine_time_s``), a decode (or ``both``) worker times decode steps of batches of streams — the
gateway's start-up profile (:mod:`controlplane.workers.profiling`) over a larger grid, without
its load bounds. The step model of :mod:`simulator.profile` is then fitted to both sets of points
at once (non-negative least squares of relative errors, :func:`simulator.profile.fit_step_model`)
and written with the engines' limits (their Health), the model's KV bytes per token, the fit's
error and every measured point (``samples``), in the format ``strata simulate`` and ``strata
worker --engine simulated`` read (simulator/profiles/README.md).

Exit status: 0 written, 1 a worker that cannot be profiled (the message says which and why), 2 bad
flags.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from controlplane.request.routing import kv_bytes_per_token
from controlplane.text.tokenizer import ModelTokenizer
from controlplane.workers.client import WorkerClient, WorkerError, WorkerHealth
from controlplane.workers.profiling import (
    ProfileResult,
    ProfileSettings,
    plan_context,
    plan_for,
    profile_worker,
)
from controlplane.workers.roles import WorkerRole
from simulator.profile import EngineProfile, StepFit, fit_step_model, profile_yaml
from strata_common.credentials import Identity, read_cluster_key
from strata_common.grpc_auth import ClientAuth
from strata_common.options import from_cli, option
from strata_common.units import parse_duration

__all__ = ["MeasureArgs", "Measured", "main", "measure"]

BYTES_PER_VALUE = {"float32": 4, "bfloat16": 2, "float16": 2}
"""KV bytes per value by the engine's dtype (what its Health says)."""


@dataclass(frozen=True, slots=True)
class MeasureArgs:
    model_dir: Path = option(help="the workers' model directory (config.json: KV size, vocabulary)")
    out: Path = option(help="the profile file to write (YAML)")
    worker: tuple[str, ...] = option(
        (),
        repeat=True,
        metavar="HOST:PORT",
        help="a worker to time (repeat: one prefill and one decode worker, or one 'both')",
    )
    name: str = option("", help="the profile's name (default: the output file's stem)")
    cluster_key_file: Path | None = option(
        None,
        help="the cluster key the workers were started with (strata serve: CACHE_DIR/cluster.key)",
    )
    max_model_len: int = option(
        2048, help="longest prompt + output timed (capped by the engines' own limit)"
    )
    max_batch: int = option(
        32, help="largest decode batch timed (capped by the engines' max_num_seqs)"
    )
    repeats: int = option(2, help="times each point is timed")
    max_step: float = option(
        60.0, parse=parse_duration, help="longest call timed; longer points are skipped"
    )
    budget: float = option(
        900.0, parse=parse_duration, help="wall-clock bound of each worker's profile, e.g. 15m"
    )
    wait: float = option(
        600.0, parse=parse_duration, help="how long to wait for the workers to be ready"
    )
    max_num_batched_tokens: int = option(
        2048,
        help="the engines' chunked-prefill budget per step (strata worker leaves vLLM's "
        "default, 2048; Health does not report it)",
    )

    def __post_init__(self) -> None:
        if not 1 <= len(self.worker) <= 2:
            raise ValueError(
                "give one or two --worker HOST:PORT (a prefill and a decode, or a both)"
            )
        if self.max_model_len < 16 or self.max_batch < 1 or self.repeats < 1:
            raise ValueError("need --max-model-len >= 16, --max-batch >= 1 and --repeats >= 1")
        if not (self.max_step > 0 and self.budget > 0 and self.wait >= 0):
            raise ValueError("need --max-step > 0, --budget > 0 and --wait >= 0")
        if self.max_num_batched_tokens < 1:
            raise ValueError("need --max-num-batched-tokens >= 1")


@dataclass(frozen=True, slots=True)
class Measured:
    """What ``strata profile`` measured and fitted."""

    profile: EngineProfile
    fit: StepFit
    prefill: ProfileResult
    decode: ProfileResult


async def _ready(client: WorkerClient, wait_s: float) -> WorkerHealth:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            health = await client.health(timeout_s=10.0)
            if health.ready and not health.draining:
                return health
            detail = "not ready" if not health.ready else "draining"
        except WorkerError as exc:
            detail = str(exc)
        if time.monotonic() >= deadline:
            raise ValueError(f"worker {client.endpoint} did not become ready: {detail}")
        await asyncio.sleep(1.0)


def _vocab_size(model_dir: Path) -> int:
    """The tokenizer's vocabulary, as the gateway's profile draws token ids (a config's
    ``vocab_size`` can be larger than what the tokenizer, and so the engine, accepts)."""
    try:
        return ModelTokenizer.from_model_dir(model_dir).vocab_size
    except (OSError, ValueError) as exc:
        raise ValueError(f"{model_dir}: cannot load its tokenizer ({exc})") from None


def _pick(healths: dict[str, WorkerHealth], roles: set[WorkerRole], what: str) -> str:
    found = [endpoint for endpoint, h in healths.items() if h.role in roles]
    if not found:
        said = ", ".join(f"{e} is {h.role.name.lower()}" for e, h in healths.items())
        raise ValueError(f"no {what} worker among --worker ({said})")
    return found[0]


async def measure(args: MeasureArgs) -> Measured:
    """Profile the workers (ValueError naming the worker and the reason when one cannot be)."""
    auth = None
    if args.cluster_key_file is not None:
        auth = ClientAuth(read_cluster_key(args.cluster_key_file), Identity("gateway", "profile"))
    clients = {endpoint: WorkerClient(endpoint, auth=auth) for endpoint in args.worker}
    try:
        healths = {
            e: h
            for e, h in zip(
                clients,
                await asyncio.gather(*(_ready(c, args.wait) for c in clients.values())),
                strict=True,
            )
        }
        prefill_at = _pick(healths, {WorkerRole.PREFILL, WorkerRole.BOTH}, "prefill (or both)")
        decode_at = _pick(healths, {WorkerRole.DECODE, WorkerRole.BOTH}, "decode (or both)")
        settings = ProfileSettings(
            max_model_len=args.max_model_len,
            max_batch=args.max_batch,
            repeats=args.repeats,
            decode_tokens=16,
            vocab_size=_vocab_size(args.model_dir),
            timeout_s=args.max_step + 30.0,
            budget_s=args.budget,
            max_step_s=args.max_step,
            max_share=1.0,
        )
        results: dict[str, ProfileResult] = {}
        for endpoint in dict.fromkeys((prefill_at, decode_at)):
            health = healths[endpoint]
            plan = plan_for(settings, health.max_model_len, health.block_size, health.capacity)
            context = plan_context(plan)
            # Prefill points on the prefill worker, decode steps on the decode one (a decode
            # worker still runs the smallest prompt first: a fresh engine's one-time costs; its
            # streams' contexts are still the whole plan's).
            if endpoint != decode_at:
                plan = replace(plan, decode_points=(), handoff_points=())
            elif endpoint != prefill_at:
                smallest = min(plan.prefill_points)
                plan = replace(plan, prefill_points=(smallest,), handoff_points=())
            try:
                results[endpoint] = await profile_worker(
                    clients[endpoint],
                    health.role,
                    plan,
                    settings,
                    seed=len(results),
                    context_limit=context,
                )
            except (WorkerError, ValueError) as exc:
                raise ValueError(f"worker {endpoint}: {exc}") from None
    finally:
        for client in clients.values():
            await client.close()
    prefill, decode = results[prefill_at], results[decode_at]
    if not prefill.measured_prefill:
        raise ValueError(
            f"worker {prefill_at}: only {prefill.num_prefill_measured} prefill points ran within "
            f"--budget {args.budget:g}s and --max-step {args.max_step:g}s (4 needed)"
        )
    if not decode.measured_decode:
        raise ValueError(f"worker {decode_at}: fewer than 3 decode points ran (raise --budget)")
    fit = fit_step_model(prefill.prefill, decode.decode)
    return Measured(
        _profile(args, healths[prefill_at], (decode_at, healths[decode_at]), fit),
        fit,
        prefill,
        decode,
    )


def _profile(
    args: MeasureArgs, prefill: WorkerHealth, decode_at: tuple[str, WorkerHealth], fit: StepFit
) -> EngineProfile:
    endpoint, decode = decode_at
    dtype = decode.dtype or "bfloat16"
    kv_bytes = kv_bytes_per_token(args.model_dir, 0, BYTES_PER_VALUE.get(dtype, 2))
    if kv_bytes <= 0:
        raise ValueError(f"{args.model_dir}/config.json does not give the KV size of a token")
    if decode.kv_capacity_tokens <= 0:
        raise ValueError(f"worker {endpoint} does not report its KV capacity")
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    source = (
        f"Measured by `strata profile` on {when}: prefill points on the {prefill.role.name.lower()}"
        f" worker ({prefill.hardware or 'hardware not reported'}), decode steps on the "
        f"{decode.role.name.lower()} worker ({decode.hardware or 'hardware not reported'}); "
        f"engine dtype {dtype}, block size {decode.block_size}.\n"
        "Prefill: a prompt alone in a step, the engine's own time (Prefill rpc engine_time_s); "
        "decode: the mean gap between a batch's streamed tokens. Grid: "
        f"ProfilePlan.for_engine up to {args.max_model_len} tokens and batch {args.max_batch}, "
        f"{args.repeats} repeat(s). Fit: the step model's six terms by non-negative least squares "
        "of relative errors (fit.mape and fit.max_error are fractions); every point is under "
        "samples. max_num_batched_tokens is --max-num-batched-tokens (not reported by workers)."
    )
    source = "\n".join(textwrap.fill(p, width=96) for p in source.splitlines())
    return EngineProfile(
        name=args.name or args.out.stem,
        model=decode.model or args.model_dir.name,
        hardware=decode.hardware or "unknown",
        source=source,
        step=fit.step,
        kv_bytes_per_token=kv_bytes,
        hbm_kv_tokens=decode.kv_capacity_tokens,
        max_num_seqs=max(1, decode.capacity),
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=min(prefill.max_model_len, decode.max_model_len),
    )


def samples_yaml(measured: Measured) -> list[str]:
    """The measured points, as YAML lines under ``samples:`` (seconds)."""
    return [
        "samples:",
        "  prefill:  # [new tokens, cached tokens, seconds]",
        *(f"  - [{n}, {c}, {s:.6g}]" for n, c, s in measured.prefill.prefill),
        "  decode:  # [batch, context tokens of the batch, seconds per step]",
        *(f"  - [{b}, {k}, {s:.6g}]" for b, k, s in measured.decode.decode),
    ]


def main(argv: list[str] | None = None) -> int:
    args = from_cli(
        MeasureArgs, argv, env_prefix="STRATA_PROFILE_", prog="strata profile", description=__doc__
    )
    try:
        measured = asyncio.run(measure(args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(profile_yaml(measured.profile, measured.fit, samples_yaml(measured)))
    except (OSError, ValueError) as exc:
        print(f"strata profile: {exc}", file=sys.stderr)
        return 1
    step, fit = measured.profile.step, measured.fit
    print(
        f"{args.out}: {fit.num_points} points, fit error mean {fit.mape:.1%} "
        f"max {fit.max_error:.1%}; prefill 512 tokens {1e3 * step.prefill_s(512, 0):.1f} ms, "
        f"decode step of 8 at 1,024 tokens each {1e3 * step.decode_step_s(8, 8 * 1024):.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
