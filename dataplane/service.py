"""The worker's gRPC service (``strata.v1.Worker``, proto/strata_proto/worker.proto): Health,
Stats, Prefill and Decode over the engine a :class:`ServedWorker` runs (dataplane/worker.py).

Prefill runs the prompt with ``max_tokens=1`` (the connector saves its blocks in that step) and
answers the first token, the block keys and where they are (``kv_node``); Decode streams the
tokens of prompt + what was generated so far (the connector loads the stored blocks).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any, Protocol

import grpc

from dataplane.config import WorkerConfig, WorkerRole
from dataplane.counters import EngineProgress, WorkerCounters
from dataplane.kv_hint import KV_NODE_PARAM
from strata_common.worker_requests import request_refusal
from strata_proto import worker_pb2, worker_pb2_grpc

__all__ = ["ServedWorker", "WorkerService"]

_FINISH = {
    "stop": worker_pb2.FINISH_REASON_STOP,
    "length": worker_pb2.FINISH_REASON_LENGTH,
    "abort": worker_pb2.FINISH_REASON_ABORT,
    "error": worker_pb2.FINISH_REASON_ABORT,
}
_ROLE = {
    WorkerRole.PREFILL: worker_pb2.ROLE_PREFILL,
    WorkerRole.DECODE: worker_pb2.ROLE_DECODE,
    WorkerRole.BOTH: worker_pb2.ROLE_BOTH,
}


class ServedWorker(Protocol):
    """What the service reads of the worker (dataplane/worker.py's ``Worker``)."""

    config: WorkerConfig
    counters: WorkerCounters
    progress: EngineProgress
    ready: bool
    draining: bool
    block_size: int
    max_model_len: int
    kv_capacity_tokens: int
    dtype: str
    hardware: str

    def generate(
        self, prompt: dict[str, Any], sampling: Any, request_id: str
    ) -> AsyncGenerator[Any, None]: ...

    def kv_identity(self) -> dict[str, Any]: ...


def _refused_input() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it refuses (a value out of range, a token id out of the
    vocabulary): ValueError, and its own client errors, which are not ValueErrors."""
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)


def sampling_params(
    sp: worker_pb2.SamplingParams, max_tokens: int, kind: Any, kv_node: str = ""
) -> Any:
    """vLLM's SamplingParams of a call; raises one of `_refused_input` for a value vLLM (or
    this) refuses."""
    from vllm import SamplingParams

    if any(not -100.0 <= bias <= 100.0 for bias in sp.logit_bias.values()):  # NaN too
        raise ValueError("logit_bias values must be in [-100, 100]")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p if sp.top_p > 0 else 1.0,
        seed=sp.seed if sp.HasField("seed") else None,
        stop=list(sp.stop) or None,
        stop_token_ids=list(sp.stop_token_ids) or None,
        ignore_eos=sp.ignore_eos,
        # vLLM's extensions: each field's zero value is "off" (worker.proto).
        **({"top_k": sp.top_k} if sp.top_k > 0 else {}),
        min_p=sp.min_p,
        repetition_penalty=sp.repetition_penalty if sp.repetition_penalty > 0 else 1.0,
        min_tokens=min(sp.min_tokens, max_tokens),
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        logit_bias=dict(sp.logit_bias) or None,
        logprobs=sp.logprobs if sp.HasField("logprobs") else None,
        structured_outputs=_structured(sp.structured) if sp.HasField("structured") else None,
        output_kind=kind,
        # The gateway detokenizes the whole sequence itself
        # (controlplane/text/detokenizer.py); the engine needs text only to match stop strings.
        detokenize=bool(sp.stop),
        # The request's params for its KV connector (vLLM's Request.kv_transfer_params): the
        # store node holding the prompt's blocks, a hint for its match (multihost.md §2).
        extra_args={"kv_transfer_params": {KV_NODE_PARAM: kv_node}} if kv_node else None,
    )


def _structured(so: worker_pb2.StructuredOutput) -> Any:
    """vLLM's StructuredOutputsParams of a call's constraint (ValueError: none set)."""
    from vllm.sampling_params import StructuredOutputsParams

    kind = so.WhichOneof("constraint")
    if kind is None:
        raise ValueError("structured output without a constraint")
    value: Any = getattr(so, kind)
    names = {"json_schema": "json", "choice": "choice"}
    return StructuredOutputsParams(
        **{names.get(kind, kind): list(value.values) if kind == "choice" else value},
        disable_any_whitespace=so.disable_any_whitespace,
        disable_additional_properties=so.disable_additional_properties,
    )


def token_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[Any] | None, num_top: int
) -> list[worker_pb2.TokenLogprobs]:
    """The wire form of vLLM's per-token logprobs (a dict per position: the sampled token's
    entry, and the ``num_top`` most likely tokens' with their ranks); none when not asked for."""
    if not logprobs:
        return []
    out = []
    for token_id, step in zip(token_ids, logprobs, strict=True):
        top = sorted(
            ((t, lp) for t, lp in step.items() if lp.rank is not None and lp.rank <= num_top),
            key=lambda item: item[1].rank,
        )
        out.append(
            worker_pb2.TokenLogprobs(
                logprob=step[token_id].logprob,
                top_token_ids=[t for t, _ in top],
                top_logprobs=[lp.logprob for _, lp in top],
            )
        )
    return out


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker: ServedWorker) -> None:
        self.worker = worker

    async def _sampling(
        self,
        context: grpc.aio.ServicerContext,
        sp: worker_pb2.SamplingParams,
        max_tokens: int,
        kind: Any,
        kv_node: str = "",
    ) -> Any:
        """:func:`sampling_params`; a value vLLM refuses aborts the call with INVALID_ARGUMENT
        (the gateway checked each one: a call that gets here came from elsewhere)."""
        try:
            return sampling_params(sp, max_tokens, kind, kv_node)
        except _refused_input() as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def _outputs(
        self, request: worker_pb2.PrefillRequest | worker_pb2.DecodeRequest, sampling: Any
    ) -> aclosing[AsyncGenerator[Any, None]]:
        """The engine's outputs for ``request``, closed (the request ended) on leaving."""
        prompt: dict[str, Any] = {"prompt_token_ids": list(request.prompt_token_ids)}
        if request.cache_salt:
            prompt["cache_salt"] = request.cache_salt
        return aclosing(self.worker.generate(prompt, sampling, request.request_id))

    async def _check(
        self,
        context: grpc.aio.ServicerContext,
        rpc: str,
        token_ids: Any,
        max_tokens: int | None = None,
    ) -> None:
        w = self.worker
        refusal = request_refusal(
            rpc,
            w.config.role.value,
            ready=w.ready,
            num_tokens=len(token_ids),
            max_model_len=w.max_model_len,
            max_tokens=max_tokens,
        )
        if refusal is not None:
            await context.abort(*refusal)

    async def Health(self, request: Any, context: Any) -> worker_pb2.HealthResponse:
        w = self.worker
        return worker_pb2.HealthResponse(
            ready=w.ready,
            role=_ROLE[w.config.role],
            model=str(w.config.model_dir),
            block_size=w.block_size,
            max_model_len=w.max_model_len,
            capacity=w.config.max_num_seqs,
            kv_capacity_tokens=w.kv_capacity_tokens,
            dtype=w.dtype,
            hardware=w.hardware,
            num_engine_requests=w.progress.num_items,
            stalled_s=w.progress.stalled_s(),
            num_engine_steps=w.progress.num_steps,
            draining=w.draining,
            **w.kv_identity(),
        )

    async def Stats(self, request: Any, context: Any) -> worker_pb2.StatsResponse:
        c = self.worker.counters
        return worker_pb2.StatsResponse(
            role=_ROLE[self.worker.config.role],
            num_requests=c.num_requests,
            num_running=c.num_running,
            kv_blocks_saved=int(c.kv["blocks_saved"]),
            kv_blocks_loaded=int(c.kv["blocks_loaded"]),
            kv_bytes_saved=int(c.kv["bytes_saved"]),
            kv_bytes_loaded=int(c.kv["bytes_loaded"]),
            kv_tokens_loaded=c.kv_tokens_loaded,
            prompt_tokens_computed=c.prompt_tokens_computed,
            kv_save_time_s=c.kv["save_time_s"],
            kv_load_time_s=c.kv["load_time_s"],
            kv_load_failures=int(c.kv["load_failures"]),
            kv_cache_blocks=c.kv_cache_blocks,
            kv_blocks_in_use=c.kv_blocks_in_use,
            engine_heap_trims=int(c.kv["heap_trims"]),
            engine_heap_trimmed_bytes=int(c.kv["heap_trimmed_bytes"]),
            engine_heap_trim_time_s=c.kv["heap_trim_time_s"],
        )

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        from vllm.sampling_params import RequestOutputKind

        await self._check(context, "Prefill", request.prompt_token_ids)
        sp = await self._sampling(context, request.sampling, 1, RequestOutputKind.FINAL_ONLY)
        counters = self.worker.counters
        counters.num_requests += 1
        counters.num_running += 1
        t0 = time.perf_counter()
        final = None
        try:
            async with self._outputs(request, sp) as outs:
                async for out in outs:
                    final = out
        except _refused_input() as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            counters.num_running -= 1
        if final is None or not final.outputs or not final.outputs[0].token_ids:
            await context.abort(grpc.StatusCode.INTERNAL, "engine returned no token")
        assert final is not None
        comp = final.outputs[0]
        params = final.kv_transfer_params or {}
        num_cached = _num_cached_tokens(final, params)
        num_external = int(params.get("strata_num_external_tokens", 0))
        counters.finish_request(len(request.prompt_token_ids), num_cached, num_external)
        logprobs = token_logprobs(comp.token_ids[:1], comp.logprobs, request.sampling.logprobs)
        return worker_pb2.PrefillResponse(
            first_token_id=comp.token_ids[0],
            first_token_logprobs=logprobs[0] if logprobs else None,
            first_token_text=comp.text,
            finish_reason=(
                worker_pb2.FINISH_REASON_STOP
                if comp.finish_reason == "stop"
                else worker_pb2.FINISH_REASON_UNSPECIFIED
            ),
            block_keys=[bytes.fromhex(k) for k in params.get("strata_block_keys", [])],
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=num_cached,
            num_external_tokens=min(num_external, num_cached),
            engine_time_s=time.perf_counter() - t0,
            kv_node=str(params.get(KV_NODE_PARAM) or ""),  # the connector's store node
        )

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        from vllm.sampling_params import RequestOutputKind

        max_tokens = request.sampling.max_tokens
        await self._check(context, "Decode", request.prompt_token_ids, max_tokens)
        sp = await self._sampling(
            context, request.sampling, max_tokens, RequestOutputKind.DELTA, request.kv_node
        )
        num_top = request.sampling.logprobs
        counters = self.worker.counters
        counters.num_requests += 1
        counters.num_running += 1
        try:
            async with self._outputs(request, sp) as outs:
                async for out in outs:
                    comp = out.outputs[0]
                    chunk = worker_pb2.DecodeChunk(
                        token_ids=comp.token_ids,
                        text=comp.text,
                        logprobs=token_logprobs(comp.token_ids, comp.logprobs, num_top),
                    )
                    if out.finished:
                        params = out.kv_transfer_params or {}
                        num_cached = _num_cached_tokens(out, params)
                        num_external = int(params.get("strata_num_external_tokens", 0))
                        chunk.finish_reason = _FINISH.get(
                            comp.finish_reason or "", worker_pb2.FINISH_REASON_ABORT
                        )
                        chunk.num_cached_tokens = num_cached
                        chunk.num_external_tokens = num_external
                        counters.finish_request(
                            len(request.prompt_token_ids), num_cached, num_external
                        )
                    yield chunk
        except _refused_input() as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            counters.num_running -= 1


def _num_cached_tokens(out: Any, params: dict[str, Any]) -> int:
    """Prompt tokens not computed: vLLM counts a planned load at scheduling time, even when the
    load then failed and the tokens were recomputed (the connector reports how many)."""
    num_cached = int(out.num_cached_tokens or 0)
    return max(0, num_cached - int(params.get("strata_num_failed_tokens", 0)))
