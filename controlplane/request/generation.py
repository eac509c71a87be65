"""One request's generation, stitched from a prefill worker and a decode worker, with failover.

The instances come from the scheduler's `Assign` (controlplane/request/routing.py): prefill on
`assign.prefill`, decode on `assign.decode`; `assign.prefill is None` is conditional
disaggregation: the decode instance computes the prompt itself (step 1 is skipped and its first
token is the request's first).

Call sequence (docs/design/gateway.md, "Prefill/decode stitching" and "Failover"):
  1. Prefill(prompt) on the assigned prefill instance -> first token, the saved block keys and
     the store node they were saved to (``kv_node``, passed to every Decode below as the hint of
     where the blocks are: docs/design/multihost.md §2). An
     unreachable instance (UNAVAILABLE: dead, restarting) is marked dead and the prefill is
     retried on the next ready one; when none is left, the decode instance prefills itself
     (as a local route); nothing was sent to the client yet. The first token is yielded at once
     (the request's TTFT). The request ends here if the prefill finished it (EOS or stop:
     "stop") or if max_tokens == 1 ("length").
  1b. Sampling whose state runs from the first token on (a seeded generator, penalties on
     output counts, one of ``n`` > 1 samples: `SamplingOptions.decode_samples_first`) is one
     engine's only if one engine samples every token: the prefill's token is dropped (nothing
     is yielded) and step 2 starts from the prompt alone, the decode instance loading the
     prefill's blocks and sampling the first token (docs/design/openai-surface.md §2). TTFT then
     includes the hand-off. A request's ``n`` samples share one prefill (`SharedPrefill`).
  2. Decode(prompt + generated, max_tokens - len(generated)) on the assigned decode instance,
     where `generated` is every token already yielded (the prefill's, or none). If the decode
     instance becomes unreachable mid-stream, or the registry marks it dead meanwhile (stalled,
     unresponsive: its calls in flight are cut, see below), the decode is resumed on the
     next ready one from prompt + every token yielded so far: the caller's stream goes on with
     no token missing or repeated (the new worker's connector loads the prompt's blocks from the
     KV store and recomputes the rest). Only when no decode instance is left does the failure
     reach the caller.
  3. The text is the gateway's own: one IncrementalDetokenizer over all generated tokens, as in
     a single engine (the workers' texts are ignored: a character split over a worker boundary
     is lost between their detokenizers, see detokenizer.py). A resumed decode is one more
     boundary and needs nothing else.
  4. All text goes through one StopStringMatcher, because a stop string can straddle the
     boundary between two workers' outputs. A gateway-side match ends the request with "stop"
     and closes the decode stream, which cancels the decode rpc.
  5. What was observed feeds the scheduler: the prefill's engine time and each decode stream's
     mean step refit the instances' latency models; the request's TTFT and mean TPOT, against
     the Assign's predictions, the MAPE gauges (registry.observe_*).

Every worker call runs through the instance's tripwire (`call_while_up` / `stream_while_up`,
controlplane/instances/instance.py): when the registry marks the instance dead for any reason
(unreachable, a Health that stays unanswered beyond its stall bound, an engine with work and no
step within it), the call is cut at once with WorkerError(UNAVAILABLE, the reason) and
cancelled, and the failover above takes over — a stopped worker does not hold its requests
until their deadline.

Other worker failures (rejected input, engine error, deadline) would fail the same way on
another worker: they surface as WorkerError at once. The caller owns the HTTP side: status
codes, formatting, and what to do with an error after the first token was sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from controlplane.api.sampling import SamplingOptions
from controlplane.instances.instance import Instance, call_while_up, stream_while_up
from controlplane.instances.registry import InstanceRegistry
from controlplane.instances.types import InstanceNotFound, InstanceState
from controlplane.metrics import GatewayMetrics
from controlplane.scheduling import Assign
from controlplane.text.detokenizer import IncrementalDetokenizer
from controlplane.text.stop import StopMatch, StopStringMatcher
from controlplane.workers.client import (
    FinishReason,
    PrefillResult,
    TokenLogprob,
    WorkerError,
    WorkerErrorKind,
    WorkerSampling,
)
from controlplane.workers.roles import WorkerRole

__all__ = ["Generation", "GenerationDelta", "GenerationRequest", "SharedPrefill"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    max_tokens: int
    """Resolved token budget (>= 1): the request's max_tokens, or what the context window leaves."""
    cache_salt: str
    arrival_s: float
    """time.monotonic() when the HTTP request arrived (TTFT and the deadline count from here)."""
    timeout_s: float
    stop_token_ids: frozenset[int]
    """EOS and the request's stop_token_ids: a sequence ending with one of them leaves its text
    out, as vLLM does."""


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    """New output: text safe to send (stop strings removed), the tokens generated since the
    previous delta (their text may be partly held back), and the finish on the last delta."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None  # "stop" | "length" on the last delta only
    logprobs: tuple[TokenLogprob, ...] = ()
    """One per token of ``token_ids`` when the request asked for logprobs."""


class SharedPrefill:
    """The one prefill of a request's ``n`` > 1 samples: the first sample to need it runs it
    (with its failover), the others wait for its outcome — the result, None (no prefill
    instance was left: each decode prefills itself), or its error. Every sample's decode
    samples its first token itself (`SamplingOptions.decode_samples_first`)."""

    __slots__ = ("_outcome",)

    def __init__(self) -> None:
        self._outcome: asyncio.Future[tuple[PrefillResult, Instance] | None] | None = None

    async def get(
        self, run: Callable[[], Awaitable[tuple[PrefillResult, Instance] | None]]
    ) -> tuple[PrefillResult, Instance] | None:
        if self._outcome is not None:
            return await asyncio.shield(self._outcome)
        outcome = self._outcome = asyncio.get_running_loop().create_future()
        try:
            result = await run()
        except asyncio.CancelledError:
            # The samples waiting for it were not cancelled: each fails as a failed prefill.
            outcome.set_exception(
                WorkerError(
                    WorkerErrorKind.FAILED, "", "Prefill", "the shared prefill was cancelled"
                )
            )
            outcome.exception()
            raise
        except Exception as exc:
            outcome.set_exception(exc)
            outcome.exception()  # retrieved: the samples that wait for it raise it themselves
            raise
        outcome.set_result(result)
        return result


class Generation:
    """Runs one GenerationRequest on the instances of `assign`; `stream()` yields its deltas,
    counters fill in as it goes. One of a request's ``n`` samples: ``sample`` (its index) and
    ``shared`` (the prefill the samples share); sample 0 counts the request's own metrics
    (its arrival, TTFT, prompt tokens)."""

    __slots__ = (
        "_assign",
        "_detokenizer",
        "_first_token_s",
        "_metrics",
        "_registry",
        "_shared",
        "finish_reason",
        "num_cached_tokens",
        "num_completion_tokens",
        "num_store_tokens",
        "request",
        "sample",
    )

    def __init__(
        self,
        request: GenerationRequest,
        registry: InstanceRegistry,
        metrics: GatewayMetrics,
        detokenizer: IncrementalDetokenizer,
        assign: Assign,
        *,
        sample: int = 0,
        shared: SharedPrefill | None = None,
    ) -> None:
        self.request = request
        self.sample = sample
        self._shared = shared
        self._assign = assign
        self._detokenizer = detokenizer
        self._registry = registry
        self._metrics = metrics
        self._first_token_s: float | None = None
        self.num_cached_tokens = 0
        self.num_store_tokens = 0
        """Of ``num_cached_tokens``: loaded from the KV store (the rest hit the engine's own
        prefix cache)."""
        self.num_completion_tokens = 0
        self.finish_reason: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def assign(self) -> Assign:
        return self._assign

    async def stream(self) -> AsyncGenerator[GenerationDelta, None]:
        try:
            async for delta in self._run():
                self.num_completion_tokens += len(delta.token_ids)
                if delta.finish_reason is not None:
                    self.finish_reason = delta.finish_reason
                yield delta
        finally:
            self._metrics.completion_tokens.inc(self.num_completion_tokens)

    def _first_token(
        self, instance: Instance, num_cached_tokens: int, *, observe: bool = True
    ) -> float:
        """Bookkeeping of the request's first token; returns its time. ``observe``: feed the
        TTFT to the latency model (not when the decode sampled the first token after a prefill:
        a route the scheduler does not predict)."""
        now = time.monotonic()
        self._first_token_s = now
        self.num_cached_tokens = num_cached_tokens
        if self.sample:
            return now  # the request's first token, prompt and TTFT are sample 0's
        ttft_s = now - self.request.arrival_s
        self._metrics.time_to_first_token.observe(ttft_s)
        self._metrics.prompt_tokens.inc(self.num_prompt_tokens)
        self._metrics.cached_prompt_tokens.inc(num_cached_tokens)
        if observe:
            self._registry.observe_ttft(self._assign, instance, ttft_s)
        return now

    def _finished(self, instance: Instance | None, last_token_s: float) -> None:
        """The request ended normally (at its prefill, or after ``instance``'s decode): its
        mean TPOT against the prediction, its length for the planner's meter."""
        first = self._first_token_s
        num_gaps = self.num_completion_tokens - 1
        tpot_s = None
        if first is not None and num_gaps >= 1 and last_token_s > first:
            tpot_s = (last_token_s - first) / num_gaps
            if instance is not None:
                self._registry.observe_tpot(self._assign, instance, tpot_s)
        self._registry.note_finished(self.num_completion_tokens, tpot_s, request=not self.sample)

    async def _run(self) -> AsyncGenerator[GenerationDelta, None]:
        req = self.request
        if not self.sample:
            self._registry.note_request()
        matcher = StopStringMatcher(req.sampling.stop)
        # Every token the caller has been given: a resumed decode continues after the last one.
        generated: list[int] = []
        block_keys: tuple[bytes, ...] = ()
        kv_node = ""  # where the prefill saved the blocks: every decode attempt's hint
        last_token_s = 0.0
        prefilled = None
        if self._assign.prefill is not None:
            prefilled = await (self._shared.get(self._prefill) if self._shared else self._prefill())
        # Sampling with state from the first token on: the decode engine samples the first token
        # itself from the prefill's saved blocks, the prefill's token is dropped (step 1b).
        decode_first = prefilled is not None and req.sampling.decode_samples_first
        prefill_cached = 0
        if prefilled is not None and decode_first:
            prefill, _ = prefilled
            self._metrics.kv_transfer_blocks.inc(len(prefill.block_keys))
            block_keys, kv_node = prefill.block_keys, prefill.kv_node
            prefill_cached = prefill.num_cached_tokens
            self.num_store_tokens = prefill.num_external_tokens
        elif prefilled is not None:
            prefill, prefill_instance = prefilled
            self.num_store_tokens = prefill.num_external_tokens
            last_token_s = self._first_token(prefill_instance, prefill.num_cached_tokens)
            finish = self._check_finish(prefill.finish_reason, prefill_instance.endpoint, "Prefill")
            if finish is None and req.max_tokens == 1:
                finish = "length"
            first_ids = (prefill.first_token_id,)
            first_lp = (prefill.first_token_logprob,) if prefill.first_token_logprob else ()
            match = self._match(matcher, first_ids, finish, 0)
            if match.stopped:
                if finish is None:
                    self._metrics.gateway_stop_hits.inc()
                yield GenerationDelta(match.text, first_ids, "stop", first_lp)
                self._finished(None, last_token_s)
                return
            if finish is not None:
                yield GenerationDelta(match.text + matcher.flush(), first_ids, finish, first_lp)
                self._finished(None, last_token_s)
                return
            yield GenerationDelta(match.text, first_ids, None, first_lp)
            self._metrics.kv_transfer_blocks.inc(len(prefill.block_keys))
            generated.append(prefill.first_token_id)
            block_keys = prefill.block_keys
            kv_node = prefill.kv_node

        local = prefilled is None
        failed: set[str] = set()
        last_error: WorkerError | None = None
        # The decode worker reports the KV it loaded on its last chunk (worker.proto); take the
        # largest value seen per attempt so that a first-chunk report would count too. A decode
        # the gateway cuts short (stop string, client gone) never sends its last chunk.
        num_external_tokens = 0
        try:
            while True:
                num_left = req.max_tokens - len(generated)
                if num_left <= 0:  # the failed worker had sent the last token, not the finish
                    yield GenerationDelta(matcher.flush(), (), "length")
                    self._finished(None, last_token_s)
                    return
                if last_error is not None and generated and req.sampling.structured is not None:
                    # A resumed decode's grammar would start over after the tokens the client
                    # already has (its prompt): the answer would break its constraint. The
                    # failure is the request's (docs/design/openai-surface.md §2).
                    raise last_error
                instance = self._decode_instance(failed, last_error)
                if last_error is not None:
                    self._failover(
                        WorkerRole.DECODE,
                        "request %s: resuming decode on %s after %d tokens (%s)",
                        instance.endpoint,
                        len(generated),
                        last_error,
                    )
                stream = stream_while_up(
                    instance,
                    "Decode",
                    instance.client.decode(
                        request_id=req.request_id,
                        prompt_token_ids=[*req.prompt_token_ids, *generated],
                        sampling=self._worker_sampling(
                            max_tokens=num_left, generated=len(generated)
                        ),
                        cache_salt=req.cache_salt,
                        block_keys=block_keys,
                        timeout_s=self._remaining_s("Decode", instance.endpoint),
                        kv_node=kv_node,
                    ),
                )
                attempt_external_tokens = 0
                context = len(req.prompt_token_ids) + len(generated)
                # A local route's decode computes the prompt first: queued prefill work until
                # its first tokens (the uncached part, as the scheduler predicted it).
                prefill_tokens = self._uncached_tokens() if local and not generated else None
                steps = _StepTimer()
                try:
                    with self._registry.track_decode(
                        instance, context, num_left, num_prefill_tokens=prefill_tokens
                    ) as tracker:
                        async with aclosing(stream) as chunks:
                            async for chunk in chunks:
                                attempt_external_tokens = max(
                                    attempt_external_tokens, chunk.num_external_tokens
                                )
                                ids = chunk.token_ids
                                num_tokens = len(ids)
                                if num_tokens:
                                    now = time.monotonic()
                                    if not generated:  # a local route, or step 1b
                                        self._first_token(
                                            instance, prefill_cached, observe=not decode_first
                                        )
                                    else:
                                        gap_s = (now - last_token_s) / num_tokens
                                        for _ in range(num_tokens):
                                            self._metrics.inter_token_latency.observe(gap_s)
                                    steps.add(now, num_tokens, instance)
                                    generated += ids
                                    tracker.add_tokens(num_tokens)
                                    last_token_s = now
                                finish = self._check_finish(
                                    chunk.finish_reason, instance.endpoint, "Decode"
                                )
                                if finish is not None and local:  # reported on the last chunk
                                    self.num_cached_tokens = min(
                                        chunk.num_cached_tokens, self.num_prompt_tokens
                                    )
                                    self.num_store_tokens = min(
                                        chunk.num_external_tokens, self.num_cached_tokens
                                    )
                                    if not self.sample:
                                        self._metrics.cached_prompt_tokens.inc(
                                            self.num_cached_tokens
                                        )
                                match = self._match(
                                    matcher, ids, finish, len(generated) - num_tokens
                                )
                                if match.stopped:
                                    if finish is None:  # the worker missed it (across workers)
                                        self._metrics.gateway_stop_hits.inc()
                                    yield GenerationDelta(match.text, ids, "stop", chunk.logprobs)
                                    self._finished(instance, last_token_s)
                                    return  # leaving the `async with` cancels the decode rpc
                                if finish is not None:
                                    yield GenerationDelta(
                                        match.text + matcher.flush(), ids, finish, chunk.logprobs
                                    )
                                    self._finished(instance, last_token_s)
                                    return
                                if num_tokens or match.text:
                                    yield GenerationDelta(match.text, ids, None, chunk.logprobs)
                except WorkerError as exc:
                    self._leave(instance, exc, failed)
                    last_error = exc
                    continue
                finally:
                    num_external_tokens += attempt_external_tokens
                    steps.report(self._registry, instance)
                raise WorkerError(
                    WorkerErrorKind.FAILED,
                    instance.endpoint,
                    "Decode",
                    "the stream ended without a finish_reason",
                )
        finally:
            self._metrics.kv_transfer_tokens.inc(num_external_tokens)

    def _uncached_tokens(self) -> int:
        """Prompt tokens the chosen instance computes, as the scheduler predicted."""
        bs = self._registry.limits.block_size
        return max(1, self.num_prompt_tokens - bs * self._assign.cached_blocks)

    def _decode_instance(self, failed: set[str], last_error: WorkerError | None) -> Instance:
        """The assigned decode instance while it is usable, then the next ready one."""
        instance = self._assigned(self._assign.decode, failed)
        if instance is not None:
            return instance
        return self._pick(WorkerRole.DECODE, failed, last_error)

    def _assigned(self, instance_id: str | None, failed: set[str]) -> Instance | None:
        if instance_id is None or instance_id in failed:
            return None
        try:
            instance = self._registry.get(instance_id)
        except InstanceNotFound:
            return None
        return instance if instance.state is InstanceState.READY else None

    async def _prefill(self) -> tuple[PrefillResult, Instance] | None:
        """Prefill on the assigned instance; on one that is unreachable, on the next one. None
        when no prefill instance is left after a failure: the decode instance prefills itself."""
        req = self.request
        failed: set[str] = set()
        last_error: WorkerError | None = None
        num_uncached = self._uncached_tokens()
        while True:
            instance = self._assigned(self._assign.prefill, failed)
            if instance is None:
                try:
                    instance = self._registry.pick(WorkerRole.PREFILL, exclude=failed)
                except WorkerError:
                    if last_error is None:
                        raise
                    self._failover(
                        WorkerRole.PREFILL,
                        "request %s: no prefill worker left (%s); the decode worker prefills",
                        last_error,
                    )
                    return None
            if last_error is not None:
                self._failover(
                    WorkerRole.PREFILL,
                    "request %s: retrying prefill on %s (%s)",
                    instance.endpoint,
                    last_error,
                )
            try:
                with self._registry.track_prefill(instance, num_uncached):
                    result = await call_while_up(
                        instance,
                        "Prefill",
                        instance.client.prefill(
                            request_id=req.request_id,
                            prompt_token_ids=req.prompt_token_ids,
                            sampling=self._worker_sampling(max_tokens=1),
                            cache_salt=req.cache_salt,
                            timeout_s=self._remaining_s("Prefill", instance.endpoint),
                        ),
                    )
            except WorkerError as exc:
                self._leave(instance, exc, failed)
                last_error = exc
                continue
            cached = min(result.num_cached_tokens, self.num_prompt_tokens)
            self._registry.observe_prefill(
                instance, self.num_prompt_tokens - cached, cached, result.engine_time_s
            )
            return result, instance

    def _leave(self, instance: Instance, error: WorkerError, failed: set[str]) -> None:
        """A call on `instance` failed: report it, and re-raise unless the request may go on
        elsewhere (then `instance` joins `failed`)."""
        self._registry.report_failure(instance, error)
        if not _can_fail_over(error):
            raise error
        failed.add(instance.id)

    def _failover(self, role: WorkerRole, message: str, *args: object) -> None:
        """Count a fail-over of `role` and log it; `message` takes the request id, then `args`."""
        self._registry.note_failover(role)
        logger.warning(message, self.request.request_id, *args)

    def _pick(self, role: WorkerRole, failed: set[str], last_error: WorkerError | None) -> Instance:
        """The next instance to try; when none is left after a failure, that failure."""
        try:
            return self._registry.pick(role, exclude=failed)
        except WorkerError:
            if last_error is not None:
                raise last_error from None
            raise

    def _match(
        self,
        matcher: StopStringMatcher,
        token_ids: tuple[int, ...],
        finish: str | None,
        num_before: int,
    ) -> StopMatch:
        """Feed the text of output tokens ``num_before``... to ``matcher``. Those within
        ``min_tokens`` cannot complete a stop string (vLLM checks stop strings once the output
        is past ``min_tokens``, over the text of the tokens after it)."""
        quiet = max(0, min(len(token_ids), self.request.sampling.min_tokens - num_before))
        if not quiet:
            return matcher.feed(self._text(token_ids, finish))
        last = quiet == len(token_ids)
        head = matcher.feed(self._text(token_ids[:quiet], finish if last else None), can_stop=False)
        if last:
            return head
        rest = matcher.feed(self._text(token_ids[quiet:], finish))
        return StopMatch(head.text + rest.text, rest.stopped)

    def _text(self, token_ids: tuple[int, ...], finish: str | None) -> str:
        """Text of new tokens; a final stop token's own text is left out (vLLM does the same)."""
        step = self._detokenizer.step
        if finish == "stop" and token_ids and token_ids[-1] in self.request.stop_token_ids:
            token_ids = token_ids[:-1]
        if len(token_ids) == 1:
            return step(token_ids[0])
        return "".join([step(t) for t in token_ids])

    def _worker_sampling(self, *, max_tokens: int, generated: int = 0) -> WorkerSampling:
        return WorkerSampling(max_tokens, self.request.sampling, generated)

    def _remaining_s(self, rpc: str, endpoint: str) -> float:
        remaining = self.request.arrival_s + self.request.timeout_s - time.monotonic()
        if remaining <= 0:
            raise WorkerError(
                WorkerErrorKind.TIMEOUT,
                endpoint,
                rpc,
                f"request timeout of {self.request.timeout_s:g} s reached",
            )
        return remaining

    @staticmethod
    def _check_finish(reason: FinishReason | None, endpoint: str, rpc: str) -> str | None:
        if reason is FinishReason.ABORT:
            raise WorkerError(
                WorkerErrorKind.FAILED, endpoint, rpc, "the engine aborted the request"
            )
        return None if reason is None else reason.value


class _StepTimer:
    """One decode attempt's mean step time, at its mean batch size and context, for the decode
    instance's latency model. The first chunk (prefill or KV load, not a step) is left out."""

    __slots__ = ("_batch_sum", "_context_sum", "_last_s", "_num_gaps", "_seconds")

    def __init__(self) -> None:
        self._last_s: float | None = None
        self._num_gaps = 0
        self._seconds = 0.0
        self._batch_sum = 0.0
        self._context_sum = 0.0

    def add(self, now: float, num_tokens: int, instance: Instance) -> None:
        if self._last_s is not None:
            self._num_gaps += num_tokens
            self._seconds += now - self._last_s
            self._batch_sum += instance.num_running_decodes * num_tokens
            self._context_sum += instance.num_context_tokens * num_tokens
        self._last_s = now

    def report(self, registry: InstanceRegistry, instance: Instance) -> None:
        if self._num_gaps >= 2:
            n = self._num_gaps
            registry.observe_decode(
                instance, self._batch_sum / n, self._context_sum / n, self._seconds / n
            )


def _can_fail_over(error: WorkerError) -> bool:
    """Only an unreachable worker (dead, restarting, not ready) is worth leaving for another: a
    rejected input, an engine error or the deadline would fail the same way elsewhere."""
    return error.kind is WorkerErrorKind.UNAVAILABLE
