"""``strata worker --engine simulated``: a SIMULATED ENGINE behind the real worker protocol.

No model runs here. Each instance serves ``strata.v1.Worker`` (proto/strata_proto/worker.proto)
over real gRPC, as `strata worker` does, but its engine is the simulator's :class:`SimEngine`
stepping in real time: a step lasts what the profile's step model says (continuous batching,
chunked prefill, KV capacity and preemption, the engine's own prefix cache), and its tokens are
a deterministic function of the two before them — so a prefill on one instance and a decode on
another produce the same sequence one instance would, as greedy engines do. It exists to drive
the real gateway with hundreds of instances on one machine (docs/benchmarks.md, "Gateway at
scale"); `strata serve` never starts it, and every instance says what it is in its Health
(``dtype`` "simulated", ``hardware`` "simulated:<profile>").

What it keeps of a real worker, because the gateway's cost and behaviour depend on it: the KV
identity (``kv_source``, the model fingerprint, a layout), so the gateway hashes prompts into
block keys as for a real one; the block keys of a prefill's saved blocks in its reply, which the
decode side then "loads" (timed as bytes over ``--kv-bandwidth``, the whole batch waiting, as
Strata's connector does today); cancellation (a call the gateway cancels leaves the engine);
the cluster key on every call; drain on SIGTERM. What it does not model: a KV store (nothing is
stored, so a prefill never loads from the pool and only the prefill role "saves"; HBM events are
not published, so the gateway's prefix index stays empty), sampling parameters other than
``max_tokens`` and stop token ids (stop strings are left to the gateway, which checks them too),
and EOS (every answer runs to its length unless stopped).

Many instances share one process (``--instances N``, ports from ``--port`` up, or free ones):
one event loop steps them all.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kvstore.blocks.hashing import block_hash_key, block_keys, model_fingerprint, root_key
from simulator.engine import SimEngine, SimSequence, StepReport
from simulator.profile import EngineProfile, load_profile
from strata_common.credentials import read_cluster_key
from strata_common.endpoints import bind_port, format_endpoint
from strata_common.grpc_auth import ServerAuthInterceptor, roles_only
from strata_common.options import from_cli, option
from strata_common.units import parse_duration, parse_size
from strata_common.worker_requests import request_refusal
from strata_proto import worker_pb2, worker_pb2_grpc

__all__ = ["SimWorkerArgs", "SimulatedWorker", "main", "next_token"]

logger = logging.getLogger("simulator.worker")

DTYPE = "simulated"
_ROLES = {
    "prefill": worker_pb2.ROLE_PREFILL,
    "decode": worker_pb2.ROLE_DECODE,
    "both": worker_pb2.ROLE_BOTH,
}
FIRST_TOKEN_ID = 1000
"""Generated tokens stay in [FIRST_TOKEN_ID, the tokenizer's base vocabulary): clear of the
special tokens at the bottom (Llama's, SmolLM's) and of the added ones at the top."""


def next_token(previous: int, before: int, vocab_size: int) -> int:
    """The token after ``before, previous``: the same wherever it is computed."""
    span = max(1, vocab_size - FIRST_TOKEN_ID)
    return FIRST_TOKEN_ID + (previous * 1_000_003 + before * 7_919 + 12_345) % span


@dataclass(frozen=True, slots=True)
class SimWorkerArgs:
    role: str = option(help="prefill, decode or both")
    model: Path = option(
        help="the model directory the gateway serves (its tokenizer, config.json and weights: "
        "the fingerprint the gateway hashes with)"
    )
    profile: Path = option(help="the simulator's engine profile (simulator/profiles/*.yaml)")
    instances: int = option(1, help="instances served by this process, each on its own port")
    host: str = option("127.0.0.1", help="address to listen on")
    port: int = option(0, help="the first instance's port, the next ones after it (0: free)")
    block_size: int = option(16, help="KV block size in tokens (vLLM's GPU default)")
    kv_bandwidth: str = option(
        "25GB", help="bytes/s a decode loads prefilled KV at and a prefill saves it at"
    )
    cluster_key_file: Path | None = option(
        None, help="answer only callers holding this cluster key (as `strata worker`)"
    )
    drain_notice_s: float = option(
        3.0,
        parse=parse_duration,
        help="on SIGTERM: how long Health reports draining, requests still served, before "
        "the instance waits for its requests (as `strata worker`)",
    )
    drain_timeout_s: float = option(
        30.0, parse=parse_duration, help="on SIGTERM: the longest wait for requests in flight"
    )

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise ValueError(f"--role must be prefill, decode or both, not {self.role!r}")
        if self.instances < 1 or self.block_size < 1:
            raise ValueError("--instances and --block-size must be >= 1")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be 0-65535, got {self.port}")
        if parse_size(self.kv_bandwidth) < 1:
            raise ValueError("--kv-bandwidth must be > 0")
        if not (self.drain_notice_s >= 0 and self.drain_timeout_s >= 0):
            raise ValueError("--drain-notice and --drain-timeout must be >= 0")


@dataclass(slots=True, eq=False)
class _Call:
    """One request on the engine: its tokens so far and what the handler waits on."""

    sequence: SimSequence
    tokens: list[int]
    loadable_tokens: int
    outputs: asyncio.Queue[tuple[int, bool]] = field(default_factory=asyncio.Queue)
    """(token, finished) per token sampled."""


class SimulatedWorker(worker_pb2_grpc.WorkerServicer):
    """One simulated instance: its engine, stepping in real time, and its gRPC service."""

    def __init__(
        self,
        args: SimWorkerArgs,
        profile: EngineProfile,
        *,
        fingerprint: bytes,
        hash_key: bytes,
        vocab_size: int,
    ) -> None:
        self.args = args
        self.profile = profile
        self.role = _ROLES[args.role]
        self._fingerprint = fingerprint
        self._hash_key = hash_key
        self._vocab = vocab_size
        self._bandwidth = float(parse_size(args.kv_bandwidth))
        self._layout = f"simulated:{profile.name}:block{args.block_size}"
        self.engine = SimEngine(
            "sim",
            profile,
            kv_block_tokens=args.block_size,
            cache_block_tokens=args.block_size,
            load=self._load,
            save_s=self._save_s,
        )
        self.endpoint = ""
        self.serving = False
        """Ready: the server is up and the engine steps (False again if its task dies)."""
        self.draining = False
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._work_since: float | None = None
        self.num_requests = 0
        self.prompt_tokens_computed = 0
        self.kv_tokens_loaded = 0
        self.kv_blocks_saved = 0
        self._stepper: asyncio.Task[None] | None = None
        self.server: grpc.aio.Server | None = None

    # -- the engine's timing callbacks -----------------------------------------------------------

    def _kv_s(self, tokens: int) -> float:
        return tokens * self.profile.kv_bytes_per_token / self._bandwidth

    def _load(self, seq: SimSequence, hit_tokens: int, limit: int) -> tuple[int, float]:
        call = self._calls[seq.request_id]
        tokens = max(0, min(limit, call.loadable_tokens - hit_tokens))
        return tokens, self._kv_s(tokens)

    def _save_s(self, seq: SimSequence) -> float:
        if self.role != worker_pb2.ROLE_PREFILL:
            return 0.0
        return self._kv_s(seq.prompt_tokens // self.args.block_size * self.args.block_size)

    # -- stepping --------------------------------------------------------------------------------

    async def run_engine(self) -> None:
        """Step while there is work: each step takes its modelled time, then its tokens go out."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.engine.has_work:
                now = loop.time()
                if self._work_since is None:
                    self._work_since = now
                duration = self.engine.start_step(now)
                if duration is None:  # nothing can run yet (no room): wait for a change
                    break
                await asyncio.sleep(duration)
                self._deliver(self.engine.finish_step())
                self._work_since = loop.time() if self.engine.has_work else None
            if not self.engine.has_work:
                self._work_since = None

    def _deliver(self, report: StepReport) -> None:
        for out in report.outputs:
            call = self._calls.get(out.sequence.request_id)
            if call is None:
                continue
            if out.prompt_done:
                computed = out.sequence.prompt_tokens - out.sequence.hit_tokens
                self.prompt_tokens_computed += computed - out.sequence.loaded_tokens
                if self.role == worker_pb2.ROLE_PREFILL:
                    self.kv_blocks_saved += out.sequence.prompt_tokens // self.args.block_size
            if out.new_tokens:
                token = next_token(call.tokens[-1], call.tokens[-2], self._vocab)
                call.tokens.append(token)
                call.outputs.put_nowait((token, out.finished))

    def _submit(self, prompt: list[int], max_new_tokens: int, loadable: int, salt: str) -> _Call:
        if len(prompt) < 2:
            prompt = [FIRST_TOKEN_ID, *prompt]  # two tokens to continue from
        keys = tuple(self._keys(prompt, salt))
        seq = SimSequence(next(self._ids), len(prompt), max_new_tokens, keys)
        self.engine.add(seq, asyncio.get_running_loop().time())  # ValueError: too long
        call = _Call(seq, list(prompt), loadable)
        self._calls[seq.request_id] = call
        self.num_requests += 1
        self._wake.set()
        return call

    async def _submit_or_abort(
        self,
        context: grpc.aio.ServicerContext,
        prompt: list[int],
        max_new_tokens: int,
        loadable: int,
        salt: str,
    ) -> _Call:
        try:
            return self._submit(prompt, max_new_tokens, loadable, salt)
        except ValueError as exc:  # more KV than the engine has
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # not reached: abort raises

    def _leave(self, call: _Call) -> None:
        """The call is over (finished or cancelled): out of the engine and the table."""
        if self._calls.pop(call.sequence.request_id, None) is not None:
            if not call.sequence.finished:
                self.engine.abort(call.sequence)
            self._wake.set()

    def _keys(self, prompt: list[int], salt: str) -> list[bytes]:
        root = root_key(self._fingerprint, self._layout, salt, self._hash_key)
        return block_keys(prompt, self.args.block_size, root, self._hash_key)

    # -- the service -----------------------------------------------------------------------------

    async def _check(
        self,
        context: grpc.aio.ServicerContext,
        rpc: str,
        tokens: Any,
        max_tokens: int | None = None,
    ) -> None:
        refusal = request_refusal(
            rpc,
            self.args.role,
            ready=self.serving,
            num_tokens=len(tokens),
            max_model_len=self.profile.max_model_len,
            max_tokens=max_tokens,
        )
        if refusal is not None:
            await context.abort(*refusal)

    async def Health(self, request: Any, context: Any) -> worker_pb2.HealthResponse:
        loop = asyncio.get_running_loop()
        since = self._work_since
        return worker_pb2.HealthResponse(
            ready=self.serving,
            role=self.role,
            model=str(self.args.model),
            block_size=self.args.block_size,
            max_model_len=self.profile.max_model_len,
            capacity=self.profile.max_num_seqs,
            kv_source=self.endpoint,
            model_fingerprint=self._fingerprint,
            kv_layout=self._layout,
            dtype=DTYPE,
            hardware=f"simulated:{self.profile.name}",
            num_engine_requests=len(self._calls),
            stalled_s=0.0 if since is None else max(0.0, loop.time() - since),
            num_engine_steps=self.engine.num_steps,
            draining=self.draining,
            kv_capacity_tokens=self.engine.capacity_tokens,
        )

    async def Stats(self, request: Any, context: Any) -> worker_pb2.StatsResponse:
        block = self.args.block_size
        return worker_pb2.StatsResponse(
            role=self.role,
            num_requests=self.num_requests,
            num_running=len(self._calls),
            kv_blocks_saved=self.kv_blocks_saved,
            kv_tokens_loaded=self.kv_tokens_loaded,
            prompt_tokens_computed=self.prompt_tokens_computed,
            kv_cache_blocks=self.engine.capacity_tokens // block,
            kv_blocks_in_use=-(-self.engine.held_tokens // block),
        )

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        await self._check(context, "Prefill", request.prompt_token_ids)
        t0 = time.perf_counter()
        prompt = list(request.prompt_token_ids)
        call = await self._submit_or_abort(context, prompt, 1, 0, request.cache_salt)
        try:
            token, _ = await call.outputs.get()
        finally:
            self._leave(call)
        if token < 0:
            await context.abort(grpc.StatusCode.INTERNAL, "the simulated engine died")
        seq = call.sequence
        stop = token in request.sampling.stop_token_ids
        return worker_pb2.PrefillResponse(
            first_token_id=token,
            finish_reason=(
                worker_pb2.FINISH_REASON_STOP if stop else worker_pb2.FINISH_REASON_UNSPECIFIED
            ),
            block_keys=list(seq.keys),
            num_prompt_tokens=len(prompt),
            num_cached_tokens=seq.hit_tokens,
            engine_time_s=time.perf_counter() - t0,
        )

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        max_tokens = request.sampling.max_tokens
        await self._check(context, "Decode", request.prompt_token_ids, max_tokens)
        prompt = list(request.prompt_token_ids)
        loadable = len(request.block_keys) * self.args.block_size
        stops = set(request.sampling.stop_token_ids)
        call = await self._submit_or_abort(
            context, prompt, max_tokens, loadable, request.cache_salt
        )
        try:
            emitted = 0
            while True:
                token, finished = await call.outputs.get()
                if token < 0:
                    await context.abort(grpc.StatusCode.INTERNAL, "the simulated engine died")
                emitted += 1
                chunk = worker_pb2.DecodeChunk(token_ids=[token])
                reason = worker_pb2.FINISH_REASON_UNSPECIFIED
                if token in stops:
                    reason = worker_pb2.FINISH_REASON_STOP
                elif finished or emitted >= max_tokens:
                    reason = worker_pb2.FINISH_REASON_LENGTH
                if reason:
                    seq = call.sequence
                    chunk.finish_reason = reason
                    chunk.num_cached_tokens = seq.hit_tokens + seq.loaded_tokens
                    chunk.num_external_tokens = seq.loaded_tokens
                    self.kv_tokens_loaded += seq.loaded_tokens
                    yield chunk
                    return
                yield chunk
        finally:
            self._leave(call)

    # -- life ------------------------------------------------------------------------------------

    async def start(self, port: int, key: bytes | None) -> int:
        interceptors = [] if key is None else [ServerAuthInterceptor(key, roles_only("gateway"))]
        self.server = grpc.aio.server(interceptors=interceptors)
        worker_pb2_grpc.add_WorkerServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        address = format_endpoint(self.args.host, port)
        bound = bind_port(self.server.add_insecure_port, address, "the simulated worker")
        await self.server.start()
        self._stepper = asyncio.create_task(self.run_engine())
        self._stepper.add_done_callback(self._engine_ended)
        self.endpoint = format_endpoint(self.args.host, bound)
        self.serving = True
        return bound

    def _engine_ended(self, task: asyncio.Task[None]) -> None:
        """The stepping task never ends but by cancellation: if it dies, the instance says it
        is not ready (the gateway fails its requests over) and its calls end with an error."""
        if task.cancelled() or task.exception() is None:
            return
        logger.error("%s: the simulated engine died", self.endpoint, exc_info=task.exception())
        self.serving = False
        for call in list(self._calls.values()):
            call.outputs.put_nowait((-1, True))  # the handlers answer INTERNAL

    async def stop(self, notice_s: float, timeout_s: float) -> None:
        """Drain as `strata worker` does: Health says draining for ``notice_s`` while requests
        are still served (gateways stop picking it), then wait up to ``timeout_s`` for those
        in flight, then stop."""
        self.draining = True
        await asyncio.sleep(notice_s)
        deadline = time.monotonic() + timeout_s
        while self._calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self._stepper is not None:
            self._stepper.cancel()


def _vocab_size(model_dir: Path) -> int:
    """The tokenizer's own vocabulary, without its added (special) tokens: what the generated
    ids are drawn below (config.json's ``vocab_size`` may be padded past the tokenizer)."""
    from tokenizers import Tokenizer

    size = int(Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size(False))
    if size <= FIRST_TOKEN_ID:
        raise ValueError(
            f"{model_dir}: a vocabulary of {size} tokens; the simulated engine draws its tokens "
            f"from ids {FIRST_TOKEN_ID} and up"
        )
    return size


async def serve(args: SimWorkerArgs) -> int:
    profile = load_profile(args.profile)
    key = None if args.cluster_key_file is None else read_cluster_key(args.cluster_key_file)
    fingerprint = model_fingerprint(args.model, DTYPE)
    hash_key = block_hash_key(key)
    vocab = _vocab_size(args.model)
    workers: list[SimulatedWorker] = []
    for i in range(args.instances):
        worker = SimulatedWorker(
            args, profile, fingerprint=fingerprint, hash_key=hash_key, vocab_size=vocab
        )
        port = await worker.start(args.port + i if args.port else 0, key)
        workers.append(worker)
        print(
            f"strata worker ready role={args.role} listening on {args.host}:{port} "
            f"instance={worker.endpoint} engine=simulated profile={profile.name}",
            flush=True,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.gather(*(w.stop(args.drain_notice_s, args.drain_timeout_s) for w in workers))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = from_cli(
        SimWorkerArgs,
        argv,
        env_prefix="STRATA_SIM_WORKER_",
        prog="strata worker --engine simulated",
        description=__doc__,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(args))
    except (OSError, ValueError) as exc:
        print(f"strata worker --engine simulated: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
