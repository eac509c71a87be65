"""The formulas every policy is built from, for one request (:class:`RequestCosts`), and the
helpers the policies share (the ready candidates, the KV transport between two instances).
The formulas themselves are written out in controlplane/scheduling/policies/__init__.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final, TypeAlias

from controlplane.instances.types import InstanceState
from controlplane.scheduling.predictor.model import PrefillCoefficients, Transport
from controlplane.scheduling.types import (
    InstanceSnapshot,
    RequestSnapshot,
    Route,
    SchedulingConfig,
)
from controlplane.workers.roles import WorkerRole

__all__ = ["INF", "Candidates", "RequestCosts", "candidates", "transport_between"]

INF: Final = math.inf
Candidates: TypeAlias = Sequence[InstanceSnapshot]
"""Ready instances of one side (prefill or decode), in the registry's order."""


class RequestCosts:
    """The formulas of the module docstring for one request, per instance.

    Built once per decision; public so the gateway and tests can ask for one prediction.
    """

    __slots__ = (
        "_block_bytes",
        "_block_size",
        "_config",
        "_hbm",
        "_load_bytes",
        "_pool",
        "_pool_ssd",
        "_prompt",
        "_request",
        "_transfer_divisor",
        "_usable_blocks",
        "needs_slot",
        "running_tpot_slo_s",
        "tpot_slo_s",
        "ttft_slo_s",
    )

    def __init__(self, request: RequestSnapshot, config: SchedulingConfig) -> None:
        self._request = request
        self._config = config
        self._prompt = request.num_prompt_tokens
        self._block_size = request.block_size
        self._usable_blocks = (request.num_prompt_tokens - 1) // request.block_size
        self._pool = min(self._usable_blocks, request.cached.pool_blocks)
        self._pool_ssd = request.cached.pool_ssd_blocks
        self._hbm = request.cached.hbm_blocks  # usually empty: the fast path below
        self._block_bytes = request.block_size * config.kv_bytes_per_token
        self._load_bytes = self._block_bytes * self._pool
        self._transfer_divisor = max(1, request.max_tokens - 1)
        self.ttft_slo_s = (
            request.ttft_slo_s if request.ttft_slo_s is not None else config.default_ttft_slo_s
        )
        tpot_slo_s = (
            request.tpot_slo_s if request.tpot_slo_s is not None else config.default_tpot_slo_s
        )
        # With a TPOT SLO, a decode instance must have a free sequence slot: a local route
        # runs the whole request there, one token or not.
        self.needs_slot = tpot_slo_s is not None
        self.running_tpot_slo_s = tpot_slo_s
        """The TPOT SLO a local prefill must leave the decode instance's running sequences,
        whatever this request's length (theirs is unknown: the request's or the default)."""
        # One token has no time per output token: after a prefill elsewhere its first token
        # ends the request (the gateway asks no decode instance), so no TPOT SLO applies.
        self.tpot_slo_s = None if request.max_tokens <= 1 else tpot_slo_s

    @property
    def request(self) -> RequestSnapshot:
        return self._request

    def hbm_blocks(self, instance: InstanceSnapshot) -> int:
        if not self._hbm:
            return 0
        return min(self._usable_blocks, self._hbm.get(instance.source_id, 0))

    def cached_blocks(self, instance: InstanceSnapshot) -> int:
        return max(self.hbm_blocks(instance), self._pool)

    def new_tokens(self, instance: InstanceSnapshot) -> int:
        return self._prompt - self._block_size * self.cached_blocks(instance)

    def queue_s(self, instance: InstanceSnapshot) -> float:
        load = instance.load
        return instance.predictor.queue_s(load.queued_prefill_tokens, load.queued_prefill_requests)

    def service_ttft_s(self, instance: InstanceSnapshot, *, local: bool) -> float:
        """TTFT without the queue: loading the cached blocks plus the prefill itself (plus one
        step of the running decodes when ``local``)."""
        return self.ttft_s(instance, local=local, queue=False)

    def quiet_ttft_s(self, instance: InstanceSnapshot) -> float:
        """The lowest TTFT ``instance`` could give this request: no queue, no decodes beside
        it, the prefill model its profile measured on the idle engine (recent prefills on a
        busy host move the model in use up, and may rescale it by a change point) and its
        quiet overhead. Only a request whose quiet
        TTFT misses the SLO on every instance is refused as unattainable (retrying cannot
        help); any other refusal is overload, with a Retry-After."""
        predictor = instance.predictor
        return self.ttft_s(
            instance,
            local=False,
            queue=False,
            prefill=predictor.calibrated_prefill_fit,
            overhead_s=predictor.quiet_ttft_overhead_s,
        )

    def ttft_s(
        self,
        instance: InstanceSnapshot,
        *,
        local: bool,
        queue: bool = True,
        prefill: PrefillCoefficients | None = None,
        overhead_s: float | None = None,
    ) -> float:
        """Predicted TTFT if ``instance`` prefills (``local``: it also decodes the request),
        with its prefill model and overhead in use unless ``prefill`` / ``overhead_s`` are
        given.

        The predictor's formulas inlined: this runs for every candidate of every decision.
        """
        hbm = self.hbm_blocks(instance) if self._hbm else 0
        cached = hbm if hbm > self._pool else self._pool
        predictor = instance.predictor
        p = predictor.prefill if prefill is None else prefill
        load = instance.load
        c = self._block_size * cached
        n = self._prompt - c
        seconds = (
            # the gateway's work and the rpc, beyond engine time
            (predictor.ttft_overhead_s if overhead_s is None else overhead_s)
            + p.fixed_s
            + p.per_new_token_s * n
            + p.per_cached_token_s * c
            + p.per_attention_pair_s * (n * c + n * (n + 1) * 0.5)
        )
        queued = load.queued_prefill_tokens
        if queue and queued > 0:
            requests = load.queued_prefill_requests or 1
            seconds += (
                p.fixed_s * requests
                + p.per_new_token_s * queued
                + p.per_attention_pair_s * queued * (queued / requests + 1.0) * 0.5
            )
        loaded = cached - hbm
        if loaded:
            ssd = self._pool_ssd if self._pool_ssd < loaded else loaded
            transfer = predictor.transfer(instance.pool_transport)
            seconds += transfer.latency_s + loaded * self._block_bytes / transfer.bytes_per_s
            if ssd:
                disk = predictor.ssd_read
                seconds += disk.latency_s + ssd * self._block_bytes / disk.bytes_per_s
        if local and load.running_decodes:
            seconds += predictor.decode.predict_s(load.running_decodes, load.decode_context_tokens)
        return seconds

    def transfer_share_s(self, decode: InstanceSnapshot, transport: Transport | None) -> float:
        """The KV transfer to ``decode`` spread over the request's output tokens (0 if local)."""
        if transport is None:
            return 0.0
        hbm = self.hbm_blocks(decode) if self._hbm else 0
        num_bytes = (self._prompt - self._block_size * hbm) * self._config.kv_bytes_per_token
        return decode.predictor.transfer_s(transport, num_bytes) / self._transfer_divisor

    def step_s(self, decode: InstanceSnapshot) -> float:
        """One decode step of ``decode``'s batch with this request added."""
        load = decode.load
        return decode.predictor.decode.predict_s(
            load.running_decodes + 1, load.decode_context_tokens + self._prompt
        )

    def tpot_s(self, decode: InstanceSnapshot, transport: Transport | None) -> float:
        """TPOT on ``decode``; ``transport``: how the KV arrives (None: it prefilled itself)."""
        return self.step_s(decode) + self.transfer_share_s(decode, transport)

    @property
    def local_fallback(self) -> bool:
        """``SchedulingConfig.local_fallback``, with conditional disaggregation on."""
        return self._config.conditional_disaggregation and self._config.local_fallback

    def local_route(self, decode: InstanceSnapshot) -> Route | None:
        """Conditional disaggregation: the route if ``decode`` should prefill itself."""
        if not self._config.conditional_disaggregation:
            return None
        if self._usable_blocks and self.hbm_blocks(decode) >= self._usable_blocks:
            return Route.LOCAL_RESIDENT
        if self.new_tokens(decode) < self._config.local_prefill_threshold_tokens:
            return Route.LOCAL_SHORT
        return None

    def has_free_slot(self, decode: InstanceSnapshot) -> bool:
        return decode.capacity == 0 or decode.load.running_decodes < decode.capacity

    def tpot_wait_s(self, decode: InstanceSnapshot, transfer_share_s: float) -> float:
        """Seconds until ``decode``'s batch is small enough to meet the TPOT SLO (0 if it does
        now; inf if not even an idle instance would)."""
        slo = self.tpot_slo_s
        if slo is None:
            return 0.0
        load = decode.load
        coefficients = decode.predictor.decode
        prompt = self._request.num_prompt_tokens
        batch = load.running_decodes
        per_sequence_context = load.decode_context_tokens / batch if batch else 0.0
        # Largest b' with step_s(b' + 1, b'·k/b + prompt) + transfer <= slo.
        budget = (
            slo
            - transfer_share_s
            - coefficients.fixed_s
            - coefficients.per_sequence_s
            - coefficients.per_context_token_s * prompt
        )
        if budget < 0.0:
            return INF
        slope = coefficients.per_sequence_s + coefficients.per_context_token_s * (
            per_sequence_context
        )
        fits = INF if slope == 0.0 else math.floor(budget / slope + 1e-9)
        if decode.capacity:
            fits = min(fits, decode.capacity - 1)
        if fits >= batch:
            return 0.0
        remaining = load.remaining_decode_tokens or self._config.default_remaining_tokens * batch
        steps = 2.0 * (remaining / batch) * (1.0 - fits / batch)
        return steps * decode.predictor.decode_step_s(batch, load.decode_context_tokens)

    def margin(self, instance: InstanceSnapshot) -> float:
        """What admission scales ``instance``'s predicted TTFT by: its ``ttft_margin`` while
        it has work (queued prefills, running decodes), 1 when idle (the prediction is then
        the service time alone, and waiting would not shorten it)."""
        load = instance.load
        if load.queued_prefill_requests or load.running_decodes:
            return instance.ttft_margin
        return 1.0

    def meets_ttft_slo(self, instance: InstanceSnapshot, ttft_s: float) -> bool:
        """Whether a predicted TTFT of ``ttft_s`` on ``instance`` is admitted: with its margin,
        within the TTFT SLO (always, without one)."""
        slo = self.ttft_slo_s
        return slo is None or ttft_s * self.margin(instance) <= slo

    def ttft_wait_s(self, instance: InstanceSnapshot, ttft_s: float, *, local: bool) -> float:
        """Seconds until a TTFT of ``ttft_s`` (now) meets the SLO, with the instance's margin,
        as the queue drains (inf if not even without a queue)."""
        slo = self.ttft_slo_s
        if slo is None or self.meets_ttft_slo(instance, ttft_s):
            return 0.0
        if self.quiet_ttft_s(instance) > slo:
            return INF
        service_s = self.service_ttft_s(instance, local=False)
        # Met once the prediction is down to SLO / margin, or once the queue has drained (an
        # idle instance is admitted on its prediction alone), whichever comes first.
        return max(0.0, min(ttft_s - slo / self.margin(instance), ttft_s - service_s))


def transport_between(prefill: InstanceSnapshot, decode: InstanceSnapshot) -> Transport:
    if prefill.host and prefill.host == decode.host:
        return Transport.SHM
    return decode.network_transport


def candidates(
    instances: Sequence[InstanceSnapshot],
) -> tuple[list[InstanceSnapshot], list[InstanceSnapshot]]:
    """Ready instances that can prefill, and those that can decode (same as ``schedulable``,
    ``can_prefill()``, ``can_decode()``, without the calls)."""
    ready, both = InstanceState.READY, WorkerRole.BOTH
    prefill, decode = WorkerRole.PREFILL, WorkerRole.DECODE
    prefills = [i for i in instances if i.state is ready and (i.role is prefill or i.role is both)]
    decodes = [i for i in instances if i.state is ready and (i.role is decode or i.role is both)]
    return prefills, decodes
