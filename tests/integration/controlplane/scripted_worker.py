"""ScriptedWorker: a TEST DOUBLE of a Strata worker for the gateway's integration tests.

It is not a model and not a simulator: it serves the real gRPC contract (worker.proto) over a real
loopback socket and replays a fixed list of token ids, the same for every prompt. Where the gateway
can tell the difference it behaves like the vLLM worker (dataplane/worker.py): texts come from the
model's real tokenizer through an incremental DecodeStream primed with the request's prompt (so a
character split over the prefill/decode boundary is lost exactly as between two real engines);
EOS ends the sequence ("stop", the EOS id counted, its text empty); stop strings are checked
against *its own* output only (a stop string straddling the boundary is missed, as by a real
worker); the prefill samples exactly one token; decode continues the script after the tokens its
prompt holds beyond the prefill's prompt (so a decode resumed elsewhere after k tokens continues
with script token k, as a greedy engine would). Failures, delays and readiness are set per test;
`Script.die_after_decode_chunks` stops the serving worker's whole server mid-stream, once (what a
killed worker looks like to the gateway: UNAVAILABLE); `Script.stall_prefill` and
`Script.stall_after_decode_chunks` make the serving worker's "engine" stop stepping, once: the
call hangs until cancelled while Health keeps answering, reporting the hanging calls as engine
work and how long it has had work without a step (what a frozen engine behind a live gRPC server
looks like). Every request and every cancelled decode is recorded. Test code only: it never
ships in the product.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from strata_proto import worker_pb2, worker_pb2_grpc

EOS_TOKEN_ID = 2
MAX_MODEL_LEN = 256
BLOCK_SIZE = 16
DEFAULT_TEXT = "Hello world!"
"""What the scripted workers generate unless a test says otherwise (7 tokens: He|ll|o| w|or|ld|!),
then EOS."""


@dataclass
class Script:
    """What the scripted "model" generates, shared by a prefill and a decode ScriptedWorker."""

    token_ids: list[int] = field(default_factory=list)
    """Generated in order for any prompt; EOS follows the last one."""
    decode_chunk_size: int = 1
    decode_delay_s: float = 0.0
    """Sleep before each decode chunk (to test cancellation and timeouts)."""
    prefill_error: grpc.StatusCode | None = None
    decode_error: grpc.StatusCode | None = None
    decode_error_after_chunks: int = 0
    num_cached_tokens: int = 0
    num_external_tokens: int = 0
    """Of the prefill's cached tokens: loaded from the store."""
    die_after_decode_chunks: int | None = None
    """The next decode to send this many chunks (unfinished) stops its worker's server, so that
    every call to it fails UNAVAILABLE; one-shot (reset when it fires)."""
    stall_prefill: bool = False
    """The next prefill hangs (its engine makes no step) until the gateway cancels it; one-shot."""
    stall_after_decode_chunks: int | None = None
    """The next decode to send this many chunks (unfinished) hangs (no step) until cancelled;
    one-shot."""
    kv_node: str = "store-a"
    """The store node the prefill says it saved the blocks to (PrefillResponse.kv_node)."""
    prompt_lengths: dict[str, int] = field(default_factory=dict)
    """Prompt length of each prefilled request id: where a decode's generated tokens start."""

    def token(self, index: int) -> int:
        return self.token_ids[index] if index < len(self.token_ids) else EOS_TOKEN_ID

    def logprobs(self, index: int, sampling: worker_pb2.SamplingParams) -> list[Any]:
        """Scripted logprobs of output token ``index`` when ``sampling`` asks for them: the
        token's own -(index + 1) / 4, the most likely; then ids after it, 1 lower each."""
        if not sampling.HasField("logprobs"):
            return []
        own = -(index + 1) / 4
        top = range(sampling.logprobs)
        return [
            worker_pb2.TokenLogprobs(
                logprob=own,
                top_token_ids=[(self.token(index) + k) % 1000 for k in top],
                top_logprobs=[own - k for k in top],
            )
        ]


class ScriptedWorker(worker_pb2_grpc.WorkerServicer):
    """A grpc.aio server replaying `script`; see the module docstring."""

    def __init__(
        self,
        role: int,
        script: Script,
        tokenizer: Tokenizer,
        *,
        max_model_len: int = 256,
        block_size: int = 16,
        model: str = "tiny",
    ) -> None:
        self.role = role
        self.script = script
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.model = model
        self.ready = True
        self.health_delay_s = 0.0
        self.prefill_requests: list[worker_pb2.PrefillRequest] = []
        self.decode_requests: list[worker_pb2.DecodeRequest] = []
        self.num_decodes_cancelled = 0
        self.num_stalled = 0
        """Calls hanging in a scripted stall (Health reports them as engine work)."""
        self.stalled_since: float | None = None
        self.num_stalls_cancelled = 0
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.port = 0
        self.host = "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(
        self,
        port: int = 0,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        *,
        host: str = "127.0.0.1",
    ) -> str:
        """Serve on ``host:port`` (0: any; another loopback address, e.g. 127.0.0.2, stands
        for another pod's IP); ``interceptors``: e.g. the secret-mode check a real worker with
        ``--cluster-key-file`` has."""
        self._server = grpc.aio.server(interceptors=interceptors)
        worker_pb2_grpc.add_WorkerServicer_to_server(self, self._server)
        self.host = host
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        await self._server.start()
        return self.endpoint

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None

    # -- the contract ----------------------------------------------------------------------

    async def _stall(self) -> None:
        """Hang as an engine that makes no step, until the call is cancelled."""
        loop = asyncio.get_running_loop()
        if self.num_stalled == 0:
            self.stalled_since = loop.time()
        self.num_stalled += 1
        try:
            await asyncio.sleep(3600)
        finally:
            self.num_stalled -= 1
            self.num_stalls_cancelled += 1

    async def Health(self, request, context):
        if self.health_delay_s:
            await asyncio.sleep(self.health_delay_s)
        stalled_s = 0.0
        if self.num_stalled and self.stalled_since is not None:
            stalled_s = asyncio.get_running_loop().time() - self.stalled_since
        return worker_pb2.HealthResponse(
            ready=self.ready,
            role=self.role,
            model=self.model,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            num_engine_requests=self.num_stalled,
            stalled_s=stalled_s,
        )

    async def Prefill(self, request, context):
        self.prefill_requests.append(request)
        self.script.prompt_lengths[request.request_id] = len(request.prompt_token_ids)
        if self.script.prefill_error is not None:
            await context.abort(self.script.prefill_error, "scripted prefill failure")
        if self.script.stall_prefill:
            self.script.stall_prefill = False
            await self._stall()
        stream = DecodeStream(ids=list(request.prompt_token_ids), skip_special_tokens=True)
        token_id = self.script.token(0)
        text, finish = self._next_output(stream, "", token_id, request.sampling)
        num_blocks = len(request.prompt_token_ids) // self.block_size
        (logprobs,) = self.script.logprobs(0, request.sampling) or [None]
        return worker_pb2.PrefillResponse(
            first_token_logprobs=logprobs,
            first_token_id=token_id,
            first_token_text=text,
            finish_reason=finish,
            block_keys=[b"block-%d" % i for i in range(num_blocks)],
            num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=self.script.num_cached_tokens,
            num_external_tokens=self.script.num_external_tokens,
            kv_node=self.script.kv_node,
        )

    async def Decode(self, request, context):
        self.decode_requests.append(request)
        script = self.script
        sampling = request.sampling
        # Primed with prompt + first token, like the decode engine: its text starts after them.
        stream = DecodeStream(ids=list(request.prompt_token_ids), skip_special_tokens=True)
        output = ""  # this call's output text: the only text its stop-string check sees
        num_sent_chars = 0
        # The prefill generated script token 0; a resumed decode's prompt holds more of them.
        # A decode with no prefill before it (conditional disaggregation) starts at token 0.
        num_prompt = len(request.prompt_token_ids)
        script.prompt_lengths.setdefault(request.request_id, num_prompt)
        start = num_prompt - script.prompt_lengths[request.request_id]
        index = start
        num_chunks = 0
        window = 0
        finish = worker_pb2.FINISH_REASON_UNSPECIFIED
        try:
            while not finish:
                if script.decode_delay_s:
                    await asyncio.sleep(script.decode_delay_s)
                if (
                    script.decode_error is not None
                    and num_chunks >= script.decode_error_after_chunks
                ):
                    finish = worker_pb2.FINISH_REASON_ABORT  # ended, but not by the client
                    await context.abort(script.decode_error, "scripted decode failure")
                ids: list[int] = []
                logprobs = []
                while len(ids) < script.decode_chunk_size and not finish:
                    logprobs += script.logprobs(index, sampling)
                    token_id = script.token(index)
                    if index - start == sampling.min_tokens:
                        window = len(output)  # stop strings end past here (vLLM's rule)
                    index += 1
                    ids.append(token_id)
                    output, finish = self._next_output(
                        stream, output, token_id, sampling, index - start - 1, window
                    )
                    if not finish and index - start >= sampling.max_tokens:
                        finish = worker_pb2.FINISH_REASON_LENGTH
                chunk = worker_pb2.DecodeChunk(
                    token_ids=ids,
                    text=output[num_sent_chars:],
                    finish_reason=finish,
                    logprobs=logprobs,
                )
                num_sent_chars = max(num_sent_chars, len(output))
                num_chunks += 1
                if finish:  # worker.proto: KV accounting comes on the last chunk
                    num_loaded = len(request.block_keys) * self.block_size
                    chunk.num_cached_tokens = num_loaded
                    chunk.num_external_tokens = num_loaded
                yield chunk
                if script.stall_after_decode_chunks == num_chunks and not finish:
                    script.stall_after_decode_chunks = None
                    await self._stall()
                if script.die_after_decode_chunks == num_chunks and not finish:
                    script.die_after_decode_chunks = None
                    # Stopping the server cancels this call too: the client sees UNAVAILABLE.
                    self._stopping = asyncio.get_running_loop().create_task(self.stop())
                    await asyncio.sleep(3600)
        finally:
            # Cancelled while awaiting (CancelledError) or while parked at `yield` (the server
            # closes the generator): either way the stream ended before its last chunk.
            if not finish:
                self.num_decodes_cancelled += 1

    def _next_output(
        self,
        stream: DecodeStream,
        output: str,
        token_id: int,
        sampling,
        num_done: int = 0,
        window: int = 0,
    ) -> tuple[str, int]:
        """(output text after this token, finish reason), as a vLLM worker computes them:
        ``num_done`` tokens made before it by this call; stop strings count once past
        ``min_tokens``, ending after ``window`` (where the text of the tokens past it starts)."""
        quiet = num_done < sampling.min_tokens
        if token_id == EOS_TOKEN_ID and not sampling.ignore_eos and not quiet:
            return output, worker_pb2.FINISH_REASON_STOP
        if token_id in sampling.stop_token_ids and not quiet:
            return output, worker_pb2.FINISH_REASON_STOP
        candidate = output + (stream.step(self.tokenizer, token_id) or "")
        if quiet:
            return candidate, worker_pb2.FINISH_REASON_UNSPECIFIED
        # vLLM's choice: the stop string that completes earliest, then the first listed.
        hits = [
            (at + len(stop), n, at)
            for n, stop in enumerate(sampling.stop)
            if (at := candidate.find(stop, max(0, window - len(stop) + 1))) != -1
        ]
        if hits:
            return candidate[: min(hits)[2]], worker_pb2.FINISH_REASON_STOP
        return candidate, worker_pb2.FINISH_REASON_UNSPECIFIED


def default_script(tokenizer: Tokenizer) -> Script:
    return Script(token_ids=tokenizer.encode(DEFAULT_TEXT, add_special_tokens=False).ids)
