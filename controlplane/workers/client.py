"""gRPC client of one worker (proto/strata_proto/worker.proto), with typed results and errors.

Nothing protobuf-shaped leaves this module: calls take plain Python values and return frozen
dataclasses, and every gRPC failure becomes a `WorkerError` whose `kind` says how the HTTP layer
should answer (503 unreachable, 504 deadline, 400 rejected input, 502 anything else).

Cancellation: `prefill()` is awaited, and grpc.aio cancels the RPC when the awaiting task is
cancelled. `decode()` is an async generator; closing it (`contextlib.aclosing`, or the task being
cancelled) cancels the server-streaming call in its `finally`, so a client that goes away stops
the decode worker's generation at once.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import grpc

from controlplane.api.sampling import SamplingOptions
from controlplane.api.structured import StructuredOutput
from controlplane.workers.roles import WorkerRole
from strata_common.grpc_auth import ClientAuth, aio_channel
from strata_proto import worker_pb2, worker_pb2_grpc

__all__ = [
    "DecodeOutput",
    "FinishReason",
    "PrefillResult",
    "WorkerClient",
    "WorkerError",
    "WorkerErrorKind",
    "WorkerHealth",
    "WorkerSampling",
]

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a 128k-token prompt is ~0.5 MB of varints; be generous
_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    # A dead worker's heartbeats must notice its return within seconds, not gRPC's default
    # reconnect backoff (up to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


_FINISH_FROM_PROTO: dict[int, FinishReason | None] = {
    worker_pb2.FINISH_REASON_UNSPECIFIED: None,
    worker_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    worker_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    worker_pb2.FINISH_REASON_ABORT: FinishReason.ABORT,
}


class WorkerErrorKind(enum.Enum):
    UNAVAILABLE = "unavailable"  # not reachable, or not ready
    TIMEOUT = "timeout"  # the request's deadline passed
    REJECTED = "rejected"  # the worker refused the input (INVALID_ARGUMENT, OUT_OF_RANGE)
    OVERLOADED = "overloaded"  # RESOURCE_EXHAUSTED
    FAILED = "failed"  # anything else, including a reply that breaks the contract


_KIND_BY_CODE = {
    grpc.StatusCode.UNAVAILABLE: WorkerErrorKind.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: WorkerErrorKind.TIMEOUT,
    grpc.StatusCode.INVALID_ARGUMENT: WorkerErrorKind.REJECTED,
    grpc.StatusCode.OUT_OF_RANGE: WorkerErrorKind.REJECTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: WorkerErrorKind.OVERLOADED,
}


class WorkerError(Exception):
    """A worker call failed; `kind` classifies it, the message names the worker and the rpc."""

    def __init__(self, kind: WorkerErrorKind, endpoint: str, rpc: str, detail: str) -> None:
        super().__init__(f"{rpc} on worker {endpoint} failed ({kind.value}): {detail}")
        self.kind = kind
        self.endpoint = endpoint
        self.rpc = rpc
        self.detail = detail


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    ready: bool
    role: WorkerRole
    model: str
    block_size: int
    max_model_len: int
    capacity: int
    """Most sequences the engine runs at once (max_num_seqs); 0 when the worker does not say."""
    kv_source: str = ""
    """Source id of the engine's HBM events in the prefix index; "" = not said."""
    model_fingerprint: bytes = b""
    """kvstore.blocks.hashing.model_fingerprint of the engine's weights; b"" = not said."""
    kv_layout: str = ""
    """The connector's KV layout name (part of every block key's root); "" = not said."""
    dtype: str = ""
    """The engine's dtype; "" = not said."""
    hardware: str = ""
    """Identity of the engine's compute (device, model, ISA, cores, dtype): engines of one model
    with equal hardware share a latency profile; "" = not said."""
    num_engine_requests: int = 0
    """Requests the engine has now (a cancelled one until the engine core processed its
    abort)."""
    stalled_s: float = 0.0
    """How long the engine has had work without completing a step (the worker's clock); 0 when
    it has no work."""
    num_engine_steps: int = 0
    """Engine steps completed since the engine started."""
    draining: bool = False
    """The worker is shutting down: no new request; those in flight run to their end."""
    kv_capacity_tokens: int = 0
    """KV tokens the engine holds; 0 when the worker does not say."""


@dataclass(frozen=True, slots=True)
class WorkerSampling:
    """Sampling for one worker call: `max_tokens` is what this call may generate; the rest is
    the request's `options` (whose own `max_tokens`, what the client asked for, is not sent).
    `generated`: output tokens the request already has before this call (the prefill's first
    token, a failed decode's tokens): `min_tokens` counts them."""

    max_tokens: int
    options: SamplingOptions
    generated: int = 0

    def to_proto(self) -> worker_pb2.SamplingParams:
        o = self.options
        params = worker_pb2.SamplingParams(
            max_tokens=self.max_tokens,
            temperature=o.temperature,
            top_p=o.top_p,
            stop=o.stop,
            stop_token_ids=o.stop_token_ids,
            ignore_eos=o.ignore_eos,
            top_k=o.top_k,
            min_p=o.min_p,
            repetition_penalty=o.repetition_penalty,
            min_tokens=max(0, min(o.min_tokens - self.generated, self.max_tokens)),
            presence_penalty=o.presence_penalty,
            frequency_penalty=o.frequency_penalty,
            logit_bias=dict(o.logit_bias),
        )
        if o.seed is not None:
            params.seed = o.seed
        if o.logprobs is not None:
            params.logprobs = o.logprobs
        if o.structured is not None:
            params.structured.CopyFrom(_structured_proto(o.structured))
        return params


def _structured_proto(so: StructuredOutput) -> worker_pb2.StructuredOutput:
    out = worker_pb2.StructuredOutput(
        disable_any_whitespace=so.disable_any_whitespace,
        disable_additional_properties=so.disable_additional_properties,
    )
    if so.kind == "json":
        out.json_schema = str(so.value)
    elif so.kind == "json_object":
        out.json_object = True
    elif so.kind == "choice":
        out.choice.values.extend(so.value if isinstance(so.value, tuple) else ())
    else:  # regex, grammar: the oneof's fields of those names
        setattr(out, so.kind, str(so.value))
    return out


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's logprob and the most likely tokens' at its step, by rank."""

    logprob: float
    top: tuple[tuple[int, float], ...]
    """(token id, logprob), most likely first; as many as the request's ``logprobs``."""


@dataclass(frozen=True, slots=True)
class PrefillResult:
    first_token_id: int
    first_token_text: str
    finish_reason: FinishReason | None
    block_keys: tuple[bytes, ...]
    num_prompt_tokens: int
    num_cached_tokens: int
    engine_time_s: float
    kv_node: str = ""
    """The store node (cluster node id) the prefill saved its blocks to; "" = unknown."""
    first_token_logprob: TokenLogprob | None = None
    """When the request asked for logprobs."""
    num_external_tokens: int = 0
    """Of ``num_cached_tokens``: loaded from the KV store (the rest: the engine's own cache)."""


@dataclass(frozen=True, slots=True)
class DecodeOutput:
    """One streamed piece of a decode: new tokens, their text, and the finish on the last one."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None
    num_cached_tokens: int
    num_external_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    """One per token, when the request asked for logprobs."""


class WorkerClient:
    """One channel to one worker; safe to share between concurrent requests."""

    __slots__ = ("_channel", "_stub", "endpoint")

    def __init__(self, endpoint: str, *, auth: ClientAuth | None = None) -> None:
        """``auth``: the gateway's cluster credentials, sent with every call (a worker started
        with a cluster key answers nothing without them; docs/design/security.md §5.1)."""
        self.endpoint = endpoint
        self._channel = aio_channel(endpoint, auth, _CHANNEL_OPTIONS)
        # Generated gRPC stubs are unannotated.
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        await self._channel.close()

    async def health(self, *, timeout_s: float) -> WorkerHealth:
        try:
            reply = await self._stub.Health(worker_pb2.HealthRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error("Health", exc) from None
        return WorkerHealth(
            ready=reply.ready,
            role=WorkerRole(reply.role) if reply.role in _ROLE_VALUES else WorkerRole.UNSPECIFIED,
            model=reply.model,
            block_size=reply.block_size,
            max_model_len=reply.max_model_len,
            capacity=reply.capacity,
            kv_source=reply.kv_source,
            model_fingerprint=reply.model_fingerprint,
            kv_layout=reply.kv_layout,
            dtype=reply.dtype,
            hardware=reply.hardware,
            num_engine_requests=reply.num_engine_requests,
            stalled_s=reply.stalled_s,
            num_engine_steps=reply.num_engine_steps,
            draining=reply.draining,
            kv_capacity_tokens=reply.kv_capacity_tokens,
        )

    async def prefill(
        self,
        *,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: WorkerSampling,
        cache_salt: str,
        timeout_s: float,
    ) -> PrefillResult:
        request = worker_pb2.PrefillRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling=sampling.to_proto(),
            cache_salt=cache_salt,
        )
        try:
            reply = await self._stub.Prefill(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error("Prefill", exc) from None
        sent = [reply.first_token_logprobs] if reply.HasField("first_token_logprobs") else []
        logprobs = self._logprobs("Prefill", sampling, 1, sent)
        return PrefillResult(
            first_token_logprob=logprobs[0] if logprobs else None,
            first_token_id=reply.first_token_id,
            first_token_text=reply.first_token_text,
            finish_reason=self._finish("Prefill", reply.finish_reason),
            block_keys=tuple(reply.block_keys),
            num_prompt_tokens=reply.num_prompt_tokens,
            num_cached_tokens=reply.num_cached_tokens,
            num_external_tokens=min(reply.num_external_tokens, reply.num_cached_tokens),
            engine_time_s=reply.engine_time_s,
            kv_node=reply.kv_node,
        )

    async def decode(
        self,
        *,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: WorkerSampling,
        cache_salt: str,
        block_keys: Sequence[bytes],
        timeout_s: float,
        kv_node: str = "",
    ) -> AsyncGenerator[DecodeOutput, None]:
        """Stream the decode; the call is cancelled when the generator is closed early.
        ``kv_node``: the store node holding the prompt's blocks (the prefill's), a hint."""
        request = worker_pb2.DecodeRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling=sampling.to_proto(),
            cache_salt=cache_salt,
            block_keys=block_keys,
            kv_node=kv_node,
        )
        call = self._stub.Decode(request, timeout=timeout_s)
        # The call's response iterator is closed here, not left suspended when the caller
        # stops early (at the final chunk, before the status arrives, or mid-way): grpc.aio
        # (>= 1.83) never frees 1-2 % of calls whose iterator is left to the garbage collector
        # (~8 KiB each: the gateway grew 0.7 MiB a minute in the soak).
        responses = call.__aiter__()
        try:
            async for chunk in responses:
                yield DecodeOutput(
                    logprobs=self._logprobs(
                        "Decode", sampling, len(chunk.token_ids), chunk.logprobs
                    ),
                    token_ids=tuple(chunk.token_ids),
                    text=chunk.text,
                    finish_reason=self._finish("Decode", chunk.finish_reason),
                    num_cached_tokens=chunk.num_cached_tokens,
                    num_external_tokens=chunk.num_external_tokens,
                )
        except grpc.aio.AioRpcError as exc:
            raise self._error("Decode", exc) from None
        finally:
            call.cancel()  # no-op once the call has finished
            await responses.aclose()

    def _error(self, rpc: str, exc: grpc.aio.AioRpcError) -> WorkerError:
        kind = _KIND_BY_CODE.get(exc.code(), WorkerErrorKind.FAILED)
        return WorkerError(kind, self.endpoint, rpc, f"{exc.code().name}: {exc.details()}")

    def _logprobs(
        self,
        rpc: str,
        sampling: WorkerSampling,
        num_tokens: int,
        sent: Sequence[worker_pb2.TokenLogprobs],
    ) -> tuple[TokenLogprob, ...]:
        """The logprobs of ``num_tokens`` tokens as the worker sent them: one per token with
        ``sampling``'s top count, or none when the request asked for none."""
        wanted = sampling.options.logprobs
        if wanted is None or not num_tokens:
            return ()
        out = []
        for item in sent:
            top = tuple(zip(item.top_token_ids, item.top_logprobs, strict=False))
            if len(item.top_token_ids) != len(item.top_logprobs) or len(top) > wanted:
                break
            out.append(TokenLogprob(item.logprob, top))
        if len(out) != num_tokens or len(sent) != num_tokens:
            raise WorkerError(
                WorkerErrorKind.FAILED,
                self.endpoint,
                rpc,
                f"logprobs malformed: {len(sent)} for {num_tokens} tokens, top {wanted} asked",
            )
        return tuple(out)

    def _finish(self, rpc: str, value: int) -> FinishReason | None:
        try:
            return _FINISH_FROM_PROTO[value]
        except KeyError:
            raise WorkerError(
                WorkerErrorKind.FAILED, self.endpoint, rpc, f"unknown finish_reason {value}"
            ) from None


_ROLE_VALUES = frozenset(role.value for role in WorkerRole)
