"""Scheduling policies: which prefill and decode instance serve a request, or a rejection.

One interface, :class:`SchedulingPolicy` (``decide(request, instances) -> Decision``), four
implementations chosen by name at run time (:func:`make_policy`): ``round_robin``,
``least_loaded``, ``prefix_aware`` and ``slo_aware`` (the default; it is also the only one that
rejects work). docs/design/scheduling.md has the derivations and a worked example; the formulas:

**Cached prefix on an instance X** (blocks of ``bs`` tokens; ``B = (prompt - 1) // bs`` blocks
can hit, as vLLM always computes the last token)::

    hbm(X)     = min(B, blocks resident in X's HBM)
    cached(X)  = max(hbm(X), min(B, pool blocks))        new(X) = prompt - bs·cached(X)
    loaded(X)  = cached(X) - hbm(X)   (read from the pool: its SSD-only blocks first, then DRAM)

**TTFT** when X prefills (``q``: its queued prefill tokens in ``r`` requests)::

    TTFT(X) = queue_s(q, r) + load_s(loaded(X)) + prefill_s(new(X), bs·cached(X))
              [+ step_s(b, k) of X's running decodes when X also decodes: local prefill]

**TPOT** on decode instance D (``b`` running sequences, ``k`` context tokens), KV moved from the
prefill instance P unless D prefilled itself::

    TPOT(D) = step_s(b + 1, k + prompt) + transfer_s(bytes of the prompt not in D's HBM)
                                            / max(1, max_tokens - 1)

with shared memory when P and D share a host, D's network transport otherwise.

**Conditional disaggregation** (every policy; ``conditional_disaggregation`` turns it off): the
chosen decode instance D prefills the request itself when every block that can hit is in its HBM
(``Route.LOCAL_RESIDENT``), or when ``new(D) < local_prefill_threshold_tokens``
(``Route.LOCAL_SHORT``); also when no prefill instance is ready, and when a BOTH instance is
picked for both sides.

**Policies.** Ties always go to the instance listed first.

* ``round_robin``: decode instances in turn; prefill instances in turn when one is needed.
* ``least_loaded``: decode: fewest running sequences, then fewest context tokens; prefill: fewest
  queued prefill tokens, then requests.
* ``prefix_aware`` (Dynamo's KV router): prefill: ``w·new(P)/bs + q(P)/bs`` (blocks to prefill
  plus queued blocks); decode: ``w·(prompt blocks not in D's HBM) + k(D)/bs`` (blocks to move in
  plus active blocks).
* ``slo_aware`` (Mooncake): the (P, D) pair (or local D) with the lowest predicted TTFT whose
  predicted TPOT meets the TPOT SLO (and D has a free sequence slot), the D with the lowest TPOT
  among equals. **Admission**: if no option meets both the TTFT and the TPOT SLO, reject:
  :attr:`RejectReason.OVERLOADED` with ``retry_after_s`` = the time until the best option's queue
  has drained enough, or :attr:`RejectReason.SLO_UNATTAINABLE` if not even idle instances could
  meet the SLOs. Waiting ``w`` seconds removes ``w`` seconds of queued prefill (so the TTFT wait
  is ``TTFT - SLO``); a decode batch shrinks as its sequences finish, assumed uniformly over
  ``2·m`` steps (``m``: mean remaining tokens per sequence), so reaching the largest batch
  ``b*`` that meets the TPOT SLO takes ``2·m·(1 - b*/b)`` steps of ``step_s(b, k)``.

Pure and synchronous: no I/O, no clocks. Policies keep no state but round-robin's positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from controlplane.instances.types import InstanceState
from controlplane.scheduling.predictor import Transport
from controlplane.scheduling.types import (
    Assign,
    Decision,
    InstanceSnapshot,
    Reject,
    RejectReason,
    RequestSnapshot,
    Route,
    SchedulingConfig,
)
from controlplane.workers.roles import WorkerRole

__all__ = [
    "DEFAULT_POLICY",
    "POLICY_NAMES",
    "LeastLoadedPolicy",
    "PrefixAwarePolicy",
    "RequestCosts",
    "RoundRobinPolicy",
    "SchedulingPolicy",
    "SloAwarePolicy",
    "make_policy",
]

_INF: Final = math.inf


class SchedulingPolicy(Protocol):
    """Chooses the instances of one request. ``instances``: the registry's snapshot, in a stable
    order (ties go to the first listed); only ready ones are ever chosen."""

    @property
    def name(self) -> str:
        """The name :func:`make_policy` knows it by."""
        ...

    def decide(
        self, request: RequestSnapshot, instances: Sequence[InstanceSnapshot]
    ) -> Decision: ...


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
        self.tpot_slo_s = (
            request.tpot_slo_s if request.tpot_slo_s is not None else config.default_tpot_slo_s
        )

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

    def ttft_s(self, instance: InstanceSnapshot, *, local: bool, queue: bool = True) -> float:
        """Predicted TTFT if ``instance`` prefills (``local``: it also decodes the request).

        The predictor's formulas inlined: this runs for every candidate of every decision.
        """
        hbm = self.hbm_blocks(instance) if self._hbm else 0
        cached = hbm if hbm > self._pool else self._pool
        predictor = instance.predictor
        p = predictor.prefill
        load = instance.load
        c = self._block_size * cached
        n = self._prompt - c
        seconds = (
            predictor.ttft_overhead_s  # the gateway's work and the rpc, beyond engine time
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
            return _INF
        slope = coefficients.per_sequence_s + coefficients.per_context_token_s * (
            per_sequence_context
        )
        fits = _INF if slope == 0.0 else math.floor(budget / slope + 1e-9)
        if decode.capacity:
            fits = min(fits, decode.capacity - 1)
        if fits >= batch:
            return 0.0
        remaining = load.remaining_decode_tokens or self._config.default_remaining_tokens * batch
        steps = 2.0 * (remaining / batch) * (1.0 - fits / batch)
        return steps * decode.predictor.decode_step_s(batch, load.decode_context_tokens)

    def ttft_wait_s(self, instance: InstanceSnapshot, ttft_s: float, *, local: bool) -> float:
        """Seconds until a TTFT of ``ttft_s`` (now) meets the SLO as the queue drains (inf if
        not even without a queue)."""
        slo = self.ttft_slo_s
        if slo is None or ttft_s <= slo:
            return 0.0
        if self.service_ttft_s(instance, local=False) > slo:
            return _INF
        return ttft_s - slo


def _transport(prefill: InstanceSnapshot, decode: InstanceSnapshot) -> Transport:
    if prefill.host and prefill.host == decode.host:
        return Transport.SHM
    return decode.network_transport


def _candidates(
    instances: Sequence[InstanceSnapshot],
) -> tuple[list[InstanceSnapshot], list[InstanceSnapshot]]:
    """Ready instances that can prefill, and those that can decode (same as ``schedulable``,
    ``can_prefill()``, ``can_decode()``, without the calls)."""
    ready, both = InstanceState.READY, WorkerRole.BOTH
    prefill, decode = WorkerRole.PREFILL, WorkerRole.DECODE
    prefills = [i for i in instances if i.state is ready and (i.role is prefill or i.role is both)]
    decodes = [i for i in instances if i.state is ready and (i.role is decode or i.role is both)]
    return prefills, decodes


def _no_decode_instance(instances: Sequence[InstanceSnapshot]) -> Reject:
    return Reject(
        RejectReason.NO_INSTANCE,
        None,
        f"no ready decode instance among {len(instances)} known",
    )


class _PickerPolicy:
    """A policy that picks the decode instance, then (unless the decode instance prefills
    itself) the prefill instance, each by its own criterion, and never rejects."""

    name: str

    def __init__(self, config: SchedulingConfig | None = None) -> None:
        self.config = config if config is not None else SchedulingConfig()

    def decide(self, request: RequestSnapshot, instances: Sequence[InstanceSnapshot]) -> Decision:
        prefills, decodes = _candidates(instances)
        if not decodes:
            return _no_decode_instance(instances)
        costs = RequestCosts(request, self.config)
        decode = self._pick_decode(costs, decodes)
        route = costs.local_route(decode)
        prefill: InstanceSnapshot | None = None
        if route is None:
            if not prefills:
                route = Route.LOCAL_NO_PREFILL
            else:
                prefill = self._pick_prefill(costs, prefills)
                if prefill.id == decode.id:
                    route, prefill = Route.LOCAL_SAME_INSTANCE, None
                else:
                    route = Route.DISAGGREGATED
        if prefill is None:
            return Assign(
                None,
                decode.id,
                costs.ttft_s(decode, local=True),
                costs.tpot_s(decode, None),
                costs.cached_blocks(decode),
                route,
                self.name,
            )
        return Assign(
            prefill.id,
            decode.id,
            costs.ttft_s(prefill, local=False),
            costs.tpot_s(decode, _transport(prefill, decode)),
            costs.cached_blocks(prefill),
            route,
            self.name,
        )

    def _pick_decode(
        self, costs: RequestCosts, decodes: Sequence[InstanceSnapshot]
    ) -> InstanceSnapshot:
        raise NotImplementedError

    def _pick_prefill(
        self, costs: RequestCosts, prefills: Sequence[InstanceSnapshot]
    ) -> InstanceSnapshot:
        raise NotImplementedError


class RoundRobinPolicy(_PickerPolicy):
    """Each side in turn over its ready instances (positions survive membership changes as
    counters modulo the current number of candidates)."""

    name = "round_robin"

    def __init__(self, config: SchedulingConfig | None = None) -> None:
        super().__init__(config)
        self._next_decode = 0
        self._next_prefill = 0

    def _pick_decode(
        self, costs: RequestCosts, decodes: Sequence[InstanceSnapshot]
    ) -> InstanceSnapshot:
        chosen = decodes[self._next_decode % len(decodes)]
        self._next_decode += 1
        return chosen

    def _pick_prefill(
        self, costs: RequestCosts, prefills: Sequence[InstanceSnapshot]
    ) -> InstanceSnapshot:
        chosen = prefills[self._next_prefill % len(prefills)]
        self._next_prefill += 1
        return chosen


class LeastLoadedPolicy(_PickerPolicy):
    name = "least_loaded"

    def _pick_decode(
        self, costs: RequestCosts, decodes: Sequence[InstanceSnapshot]
    ) -> InstanceSnapshot:
        return min(decodes, key=lambda d: (d.load.running_decodes, d.load.decode_context_tokens))

    def _pick_prefill(
        self, costs: RequestCosts, prefills: Sequence[InstanceSnapshot]
    ) -> InstanceSnapshot:
        return min(
            prefills,
            key=lambda p: (p.load.queued_prefill_tokens, p.load.queued_prefill_requests),
        )


class PrefixAwarePolicy(_PickerPolicy):
    """Dynamo's KV-router cost, in blocks: work the instance would add plus work it has."""

    name = "prefix_aware"

    def _pick_decode(
        self, costs: RequestCosts, decodes: Sequence[InstanceSnapshot]
    ) -> InstanceSnapshot:
        return min(decodes, key=lambda d: self.decode_cost(costs, d))

    def _pick_prefill(
        self, costs: RequestCosts, prefills: Sequence[InstanceSnapshot]
    ) -> InstanceSnapshot:
        return min(prefills, key=lambda p: self.prefill_cost(costs, p))

    def prefill_cost(self, costs: RequestCosts, prefill: InstanceSnapshot) -> float:
        """``w·new(P)/bs + q(P)/bs``: blocks to prefill plus queued blocks."""
        block_size = costs.request.block_size
        return (
            self.config.overlap_weight * costs.new_tokens(prefill)
            + prefill.load.queued_prefill_tokens
        ) / block_size

    def decode_cost(self, costs: RequestCosts, decode: InstanceSnapshot) -> float:
        """``w·(prompt blocks not in D's HBM) + k(D)/bs``: blocks to bring in plus active ones."""
        request = costs.request
        block_size = request.block_size
        prompt_blocks = -(-request.num_prompt_tokens // block_size)
        missing = prompt_blocks - costs.hbm_blocks(decode)
        return self.config.overlap_weight * missing + decode.load.decode_context_tokens / block_size


class SloAwarePolicy:
    """Mooncake's: lowest predicted TTFT whose predicted TPOT meets the SLO; admission control."""

    name = "slo_aware"

    def __init__(self, config: SchedulingConfig | None = None) -> None:
        self.config = config if config is not None else SchedulingConfig()

    def decide(self, request: RequestSnapshot, instances: Sequence[InstanceSnapshot]) -> Decision:
        prefills, decodes = _candidates(instances)
        if not decodes:
            return _no_decode_instance(instances)
        costs = RequestCosts(request, self.config)
        ttft_slo = costs.ttft_slo_s if costs.ttft_slo_s is not None else _INF
        tpot_slo = costs.tpot_slo_s if costs.tpot_slo_s is not None else _INF
        check_slots = costs.tpot_slo_s is not None

        # Options where the decode instance prefills itself: (ttft, tpot, order, route, D).
        local: list[tuple[float, float, int, Route, InstanceSnapshot]] = []
        remote: list[tuple[int, InstanceSnapshot]] = []  # decode instances that need a prefill
        for order, decode in enumerate(decodes):
            route = costs.local_route(decode)
            if route is None and not prefills:
                route = Route.LOCAL_NO_PREFILL
            if route is None:
                remote.append((order, decode))
                if decode.can_prefill():  # BOTH: itself, as a colocated option
                    route = Route.LOCAL_SAME_INSTANCE
                else:
                    continue
            local.append(
                (costs.ttft_s(decode, local=True), costs.tpot_s(decode, None), order, route, decode)
            )

        # Disaggregated options: prefill instances by TTFT, each with its best decode instance.
        ranked = sorted(
            ((costs.ttft_s(p, local=False), order, p) for order, p in enumerate(prefills)),
            key=lambda option: (option[0], option[1]),
        )
        tpot_by_route = _DecodeTable(costs, remote, check_slots)
        best: tuple[float, float, int, Assign] | None = None
        for ttft, _, prefill in ranked:
            if ttft > ttft_slo:
                break
            found = tpot_by_route.best_for(prefill, tpot_slo)
            if found is not None:
                tpot, order, decode = found
                best = (
                    ttft,
                    tpot,
                    order,
                    Assign(
                        prefill.id,
                        decode.id,
                        ttft,
                        tpot,
                        costs.cached_blocks(prefill),
                        Route.DISAGGREGATED,
                        self.name,
                    ),
                )
                break
        for ttft, tpot, order, route, decode in local:
            if ttft > ttft_slo or tpot > tpot_slo:
                continue
            if check_slots and not costs.has_free_slot(decode):
                continue
            if best is None or (ttft, tpot, order) < best[:3]:
                assign = Assign(
                    None,
                    decode.id,
                    ttft,
                    tpot,
                    costs.cached_blocks(decode),
                    route,
                    self.name,
                )
                best = (ttft, tpot, order, assign)
        if best is not None:
            return best[3]
        return self._reject(costs, ranked, tpot_by_route, local)

    def _reject(
        self,
        costs: RequestCosts,
        ranked: Sequence[tuple[float, int, InstanceSnapshot]],
        decode_table: _DecodeTable,
        local: Sequence[tuple[float, float, int, Route, InstanceSnapshot]],
    ) -> Reject:
        """Admission: no option meets both SLOs. The wait of a pair is the longer of its two
        sides' waits; sides are independent across pairs, so the best pair waits
        ``max(min TTFT wait, min TPOT wait)``."""
        wait = _INF
        if ranked and decode_table.rows:
            ttft_wait = min(
                costs.ttft_wait_s(prefill, ttft, local=False) for ttft, _, prefill in ranked
            )
            tpot_wait = min(decode_table.tpot_waits(ranked))
            wait = max(ttft_wait, tpot_wait)
        for ttft, _, _, _, decode in local:
            option = max(
                costs.ttft_wait_s(decode, ttft, local=True),
                costs.tpot_wait_s(decode, 0.0),
            )
            wait = min(wait, option)
        slos = f"TTFT SLO {_fmt(costs.ttft_slo_s)}, TPOT SLO {_fmt(costs.tpot_slo_s)}"
        if wait == _INF:
            return Reject(
                RejectReason.SLO_UNATTAINABLE,
                None,
                f"no instance could meet {slos} even when idle",
            )
        config = self.config
        retry = min(config.max_retry_after_s, max(config.min_retry_after_s, wait))
        return Reject(RejectReason.OVERLOADED, retry, f"no instance pair meets {slos} now")


def _fmt(slo: float | None) -> str:
    return "none" if slo is None else f"{slo * 1e3:g} ms"


class _DecodeTable:
    """TPOT of each decode instance that needs a prefill, by how its KV would arrive, so that
    the best decode instance for a prefill instance costs O(hosts), not O(decode instances)."""

    __slots__ = ("_by_host", "_costs", "_network", "rows")

    def __init__(
        self,
        costs: RequestCosts,
        decodes: Sequence[tuple[int, InstanceSnapshot]],
        check_slots: bool,
    ) -> None:
        self._costs = costs
        self.rows = decodes
        network: list[tuple[float, int, InstanceSnapshot]] = []
        by_host: dict[str, tuple[float, int, InstanceSnapshot]] = {}
        for order, decode in decodes:
            if check_slots and not costs.has_free_slot(decode):
                continue
            step = costs.step_s(decode)
            network.append(
                (step + costs.transfer_share_s(decode, decode.network_transport), order, decode)
            )
            if decode.host:
                entry = (step + costs.transfer_share_s(decode, Transport.SHM), order, decode)
                if decode.host not in by_host or entry[:2] < by_host[decode.host][:2]:
                    by_host[decode.host] = entry
        network.sort(key=lambda row: (row[0], row[1]))
        self._network = network
        self._by_host = by_host

    def best_for(
        self, prefill: InstanceSnapshot, tpot_slo: float
    ) -> tuple[float, int, InstanceSnapshot] | None:
        """The decode instance with the lowest TPOT after a prefill on ``prefill`` (not itself),
        if it meets ``tpot_slo``."""
        best: tuple[float, int, InstanceSnapshot] | None = None
        for row in self._network:
            if row[2].id == prefill.id or (prefill.host and row[2].host == prefill.host):
                continue
            best = row
            break
        same_host = self._by_host.get(prefill.host) if prefill.host else None
        if same_host is not None and same_host[2].id == prefill.id:
            same_host = self._same_host_excluding(prefill)
        if same_host is not None and (best is None or same_host[:2] < best[:2]):
            best = same_host
        if best is None or best[0] > tpot_slo:
            return None
        return best

    def _same_host_excluding(
        self, prefill: InstanceSnapshot
    ) -> tuple[float, int, InstanceSnapshot] | None:
        rows = [
            (self._costs.tpot_s(d, Transport.SHM), order, d)
            for order, d in self.rows
            if d.host == prefill.host and d.id != prefill.id
        ]
        return min(rows, key=lambda row: (row[0], row[1]), default=None)

    def tpot_waits(self, prefills: Sequence[tuple[float, int, InstanceSnapshot]]) -> list[float]:
        """Per decode instance, its TPOT wait with the KV arriving the fastest way it can (by
        shared memory when some prefill instance shares its host)."""
        hosts = {p.host for _, _, p in prefills if p.host}
        costs = self._costs
        waits = []
        for _, decode in self.rows:
            transport = Transport.SHM if decode.host in hosts else decode.network_transport
            waits.append(costs.tpot_wait_s(decode, costs.transfer_share_s(decode, transport)))
        return waits


_POLICIES: Final[dict[str, Callable[[SchedulingConfig | None], SchedulingPolicy]]] = {
    RoundRobinPolicy.name: RoundRobinPolicy,
    LeastLoadedPolicy.name: LeastLoadedPolicy,
    PrefixAwarePolicy.name: PrefixAwarePolicy,
    SloAwarePolicy.name: SloAwarePolicy,
}
POLICY_NAMES: Final = tuple(_POLICIES)
DEFAULT_POLICY: Final = SloAwarePolicy.name


def make_policy(name: str, config: SchedulingConfig | None = None) -> SchedulingPolicy:
    """The policy called ``name`` (one of :data:`POLICY_NAMES`); ValueError otherwise."""
    factory = _POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    return factory(config)
