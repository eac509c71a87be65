"""One simulation run: a setup, a trace at one rate, the events (docs/design/simulator.md §2).

:class:`Simulation` builds the cluster (instances with their engines and latency models, a store
node per host when the setup has a pool, one prefix index fed by both), replays the requests and
returns one :class:`RequestRecord` each. A request's life: arrival; the gateway's decision
``gateway_overhead_s`` later (the real policy; a rejection ends it); a prefill on its prefill
instance (pool hits loaded, the new blocks saved to the host's store node, the first token out)
and a hand-off to the decode instance, or a local prefill on the decode instance; decode steps
until its last token. The gateway's counters and the latency models' observations follow it as
in the real gateway.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from controlplane.planning import PoolSizes
from controlplane.scheduling import (
    Assign,
    LatencyPredictor,
    Reject,
    Transport,
)
from controlplane.workers.roles import WorkerRole
from kvstore.blocks.hashing import BlockKey
from kvstore.blocks.tier import Tier
from kvstore.cluster.events import BlocksRemoved, BlocksStored
from kvstore.cluster.index import PrefixIndex
from simulator.config import Setup, Shape, SimConfig, Timing
from simulator.engine import SimEngine, SimSequence, StepReport
from simulator.gateway import SimGateway, SimInstance
from simulator.pools import SimPools
from simulator.store import SimStoreNode
from simulator.trace import TraceRequest

__all__ = ["TOO_LONG", "RequestRecord", "Simulation"]

_DECIDE, _STEP_END, _WAKE, _HANDOFF, _PLAN, _READY = 0, 1, 2, 3, 4, 5
Keys = tuple[BlockKey, ...]
TOO_LONG = "too_long"


@dataclass(slots=True)
class RequestRecord:
    """One request's fate. Times are on the simulation clock (seconds)."""

    index: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    rejected: str | None = None
    """The reject reason (``overloaded``, ``slo_unattainable``, ``no_instance``; ``too_long``:
    prompt and output exceed the engine's context or KV, refused with 400 by any system), or
    None."""
    route: str = ""
    prefill: str | None = None
    decode: str | None = None
    predicted_ttft_s: float = math.nan
    predicted_tpot_s: float = math.nan
    first_token_s: float | None = None
    last_token_s: float | None = None
    num_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the prefilling engine did not compute (its HBM hits and pool loads)."""
    load_cap_tokens: int | None = None
    """The most the prefilling engine loads: what the decision counted on using, when the
    policy chose to compute part of what was cached; None: whatever the pool holds."""
    # The gateway's bookkeeping of the request in flight.
    uncached_tokens: int = 0
    overlapped: bool = False
    prefill_starts: int = 0
    decode_started_s: float = 0.0
    gaps: int = 0
    gap_s: float = 0.0
    batch_sum: float = 0.0
    context_sum: float = 0.0
    decode_context: int = 0
    decode_remaining: int = 0
    handoff: bool = False
    handoff_first_s: float | None = None
    """When a hand-off's decode produced its first token (the request's second)."""

    @property
    def finished(self) -> bool:
        return self.rejected is None and self.num_tokens >= self.output_tokens

    @property
    def ttft_s(self) -> float:
        return math.inf if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        if self.first_token_s is None or self.last_token_s is None:
            return math.inf
        if self.num_tokens < 2:
            return 0.0
        return (self.last_token_s - self.first_token_s) / (self.num_tokens - 1)

    def met(self, ttft_slo_s: float, tpot_slo_s: float) -> bool:
        return self.finished and self.ttft_s <= ttft_slo_s and self.tpot_s <= tpot_slo_s


class Simulation:
    """One setup over one arrival sequence; :meth:`run` once."""

    def __init__(self, config: SimConfig, setup: Setup, requests: Sequence[TraceRequest]) -> None:
        self.config = config
        self.setup = setup
        self.requests = requests
        self.index = PrefixIndex(initial_capacity=4096)
        self._seqs: dict[str, int] = {}
        self._sync_save = setup.pool and setup.kv_save is Timing.SYNC
        self._wakes: dict[int, float] = {}
        self.nodes: dict[str, SimStoreNode] = {}
        profile = config.profile
        if setup.pool:
            blocks = max(1, config.store.dram_bytes // config.block_bytes)
            ssd_blocks = config.store.ssd_bytes // config.block_bytes
            for h in range(math.ceil(config.gpus / config.gpus_per_host)):
                host = f"h{h}"
                self.nodes[host] = SimStoreNode(
                    f"store-{host}",
                    host,
                    dram_blocks=blocks,
                    ssd_blocks=ssd_blocks,
                    eviction=config.store.eviction_policy,
                    publish=self._publisher(f"store-{host}"),
                )
        prefill_samples, decode_samples = profile.calibration_samples(config.cache_block_tokens)
        instances: list[SimInstance] = []
        tp = profile.tensor_parallel
        num_prefills = setup.prefill_gpus // tp
        num_decodes = (setup.decode_gpus or config.gpus - setup.prefill_gpus) // tp
        if setup.shape is Shape.COLOCATED:
            slots = [(WorkerRole.BOTH, f"c{g}", g) for g in range(config.num_instances)]
        elif setup.planner is None:
            slots = [(WorkerRole.PREFILL, f"p{g}", g) for g in range(num_prefills)]
            slots += [(WorkerRole.DECODE, f"d{g}", num_prefills + g) for g in range(num_decodes)]
        else:  # every GPU may end up in either pool
            slots = [(WorkerRole.PREFILL, f"p{g}", g) for g in range(config.num_instances)]
            slots += [(WorkerRole.DECODE, f"d{g}", g) for g in range(config.num_instances)]
        for role, name, g in slots:
            host = config.host_of(g)
            engine = SimEngine(
                name,
                profile,
                kv_block_tokens=config.kv_block_tokens,
                cache_block_tokens=config.cache_block_tokens,
                load=self._loader(name),
                save_s=self._saver(name)
                if self._sync_save and role is not WorkerRole.DECODE
                else None,
                publish=self._hbm_publisher(name),
                async_load=setup.kv_load is Timing.ASYNC,
            )
            predictor = LatencyPredictor(transfers=config.transfers, ssd_read=config.ssd_read)
            predictor.calibrate(
                prefill_samples, decode_samples, ttft_overhead_s=config.gateway_overhead_s
            )
            instances.append(SimInstance(name, role, host, engine, predictor))
        self.pools = SimPools(
            config,
            setup,
            instances,
            None if setup.planner is None else PoolSizes(num_prefills, num_decodes),
        )
        self.gateway = SimGateway(config, setup, instances, self.index)
        self.instances = self.gateway.by_id
        self.records = [
            RequestRecord(r.index, r.arrival_s, r.input_tokens, r.output_tokens) for r in requests
        ]
        self._max_tokens = min(
            profile.max_model_len, min(i.engine.capacity_tokens for i in instances)
        )
        self._events: list[tuple[float, int, int, int]] = []
        self._order = 0
        self.now = 0.0

    # -- the index's feed ----------------------------------------------------------------------

    def _publisher(
        self, source: str
    ) -> Callable[[Tier, tuple[BlockKey, ...], tuple[BlockKey, ...]], None]:
        def publish(
            tier: Tier, stored: tuple[BlockKey, ...], removed: tuple[BlockKey, ...]
        ) -> None:
            if stored:
                self.index.apply(BlocksStored(source, self._next_seq(source), tier, stored))
            if removed:
                self.index.apply(BlocksRemoved(source, self._next_seq(source), tier, removed))

        return publish

    def _hbm_publisher(self, source: str) -> Callable[[Keys, Keys], None]:
        """An engine's prefix-cache changes, as its worker's HBM events."""
        publish = self._publisher(source)

        def hbm(stored: Keys, removed: Keys) -> None:
            publish(Tier.HBM, stored, removed)

        return hbm

    def _next_seq(self, source: str) -> int:
        seq = self._seqs.get(source, 0)
        self._seqs[source] = seq + 1
        return seq

    # -- transfers -----------------------------------------------------------------------------

    def _transport(self, from_host: str, to_host: str) -> Transport:
        return Transport.SHM if from_host == to_host else self.config.network

    def _bytes_s(self, transport: Transport, num_tokens: int) -> float:
        # Each GPU of an instance moves its own share over its own link, at once.
        num_bytes = num_tokens * self.config.profile.kv_bytes_per_token
        return self.config.transfers[transport].predict_s(num_bytes)

    def _loader(self, name: str) -> Callable[[SimSequence, int, int], tuple[int, float]]:
        def load(seq: SimSequence, start: int, limit: int) -> tuple[int, float]:
            record = self.records[seq.request_id]
            instance = self.instances[name]
            if record.handoff and record.decode == name and record.prefill is not None:
                # The request's own KV, saved by its prefill (whole kv blocks).
                source = self.instances[record.prefill]
                whole = record.input_tokens // self.config.kv_block_tokens
                tokens = min(limit, whole * self.config.kv_block_tokens - start)
                if tokens <= 0:
                    return 0, 0.0
                return tokens, self._bytes_s(self._transport(source.host, instance.host), tokens)
            if record.load_cap_tokens is not None:
                limit = min(limit, record.load_cap_tokens - start)
                if limit <= 0:
                    return 0, 0.0  # the policy chose to compute the rest
            return self._load_from_pool(seq, start, limit, instance.host)

        return load

    def _load_from_pool(
        self, seq: SimSequence, start: int, limit: int, host: str
    ) -> tuple[int, float]:
        """Leading cache blocks from ``start`` that store nodes hold, read (the local node
        first) and timed; SSD-only ones pay the SSD read too."""
        if not self.nodes:
            return 0, 0.0
        cb = self.config.cache_block_tokens
        first = start // cb
        last = min(len(seq.keys), (start + limit) // cb)
        local = self.nodes.get(host)
        by_node: dict[str, list[BlockKey]] = {}
        tokens = 0
        for key in seq.keys[first:last]:
            holder = local if local is not None and local.tier_of(key) is not None else None
            if holder is None:
                holder = next((n for n in self.nodes.values() if n.tier_of(key) is not None), None)
            if holder is None:
                break
            by_node.setdefault(holder.host, []).append(key)
            tokens += cb
        seconds = 0.0
        for node_host, keys in by_node.items():
            _, ssd = self.nodes[node_host].read(keys)
            seconds += self._bytes_s(self._transport(node_host, host), len(keys) * cb)
            if ssd:
                seconds += self.config.ssd_read.predict_s(ssd * self.config.block_bytes)
            if local is not None and node_host != host:
                local.put(keys)  # read through the reader's own node, which keeps a copy
        return tokens, seconds

    def _saver(self, name: str) -> Callable[[SimSequence], float]:
        def save_s(seq: SimSequence) -> float:
            """Save the prompt's whole kv blocks the host's node lacks (its leading held
            cache blocks are skipped), over shared memory."""
            instance = self.instances[name]
            node = self.nodes[instance.host]
            held = node.held(seq.keys) * self.config.cache_block_tokens
            kb = self.config.kv_block_tokens
            tokens = self.records[seq.request_id].input_tokens // kb * kb - held
            return self._bytes_s(Transport.SHM, tokens) if tokens > 0 else 0.0

        return save_s

    # -- events --------------------------------------------------------------------------------

    def _push(self, at: float, kind: int, target: int) -> None:
        heapq.heappush(self._events, (at, self._order, kind, target))
        self._order += 1

    def _wake(self, instance: SimInstance, number: int) -> None:
        engine = instance.engine
        if engine.stepping or not engine.has_work:
            return
        duration = engine.start_step(self.now)
        if duration is not None:
            self._push(self.now + duration, _STEP_END, number)
            return
        ready = engine.next_ready_at()  # only loads in progress: step when the first is done
        if ready is not None and ready < self._wakes.get(number, math.inf):
            self._wakes[number] = ready
            self._push(ready, _WAKE, number)

    def run(self, progress: Callable[[int], None] | None = None) -> list[RequestRecord]:
        """Replay every request to its end; the records, in trace order."""
        numbers = {i.id: n for n, i in enumerate(self.gateway.instances)}
        self._numbers = numbers
        for n, request in enumerate(self.requests):
            self._push(request.arrival_s + self.config.gateway_overhead_s, _DECIDE, n)
        planning = self.config.planning.interval_s
        if self.pools.planner is not None and self.requests:
            self._push(planning, _PLAN, 0)
        last_arrival = max((r.arrival_s for r in self.requests), default=0.0)
        done = 0
        while self._events:
            at, _, kind, target = heapq.heappop(self._events)
            self.now = at
            if kind == _DECIDE:
                self._decide(target)
                done += 1
                if progress is not None:
                    progress(done)
            elif kind == _STEP_END:
                instance = self.gateway.instances[target]
                self._step_end(instance, instance.engine.finish_step())
                self._wake(instance, target)
                self.pools.maybe_stop(instance, at)
            elif kind == _PLAN:
                for started in self.pools.plan(at):
                    self._push(started.ready_at, _READY, numbers[started.id])
                if at < last_arrival:
                    self._push(at + planning, _PLAN, 0)
            elif kind == _READY:
                self.pools.ready(self.gateway.instances[target], at)
            elif kind == _WAKE:
                if self._wakes.get(target) == at:
                    del self._wakes[target]
                self._wake(self.gateway.instances[target], target)
            else:
                self._hand_off(target)
        self.pools.finish(self.now)
        stuck = [r.index for r in self.records if not r.finished and r.rejected is None]
        if stuck:  # an engine left with work and nothing to wake it: a bug, not a figure
            raise RuntimeError(f"{len(stuck)} requests never finished (first: {stuck[:5]})")
        return self.records

    # -- a request's life ----------------------------------------------------------------------

    def _decide(self, n: int) -> None:
        request, record = self.requests[n], self.records[n]
        if request.input_tokens + request.output_tokens > self._max_tokens:
            record.rejected = TOO_LONG
            return
        decision, cached_prefix = self.gateway.decide(
            request.input_tokens, request.output_tokens, request.keys, self.now
        )
        if isinstance(decision, Reject):
            record.rejected = decision.reason.value
            self.pools.arrived(request.input_tokens, request.input_tokens)
            return
        assert isinstance(decision, Assign)
        record.route = decision.route.value
        record.prefill, record.decode = decision.prefill, decision.decode
        record.predicted_ttft_s = decision.predicted_ttft_s
        record.predicted_tpot_s = decision.predicted_tpot_s
        cb = self.config.cache_block_tokens
        cached = decision.cached_blocks * cb
        # The connector loads whatever the pool holds at admission, unless the policy chose to
        # compute part of what was cached (conductor's recompute below its threshold).
        target_id = decision.prefill if decision.prefill is not None else decision.decode
        usable = (request.input_tokens - 1) // cb
        available = min(
            usable, max(cached_prefix.pool_blocks, cached_prefix.hbm_blocks.get(target_id, 0))
        )
        record.load_cap_tokens = cached if decision.cached_blocks < available else None
        uncached = max(1, request.input_tokens - cached)
        record.uncached_tokens = uncached
        self.pools.arrived(request.input_tokens, uncached)
        for instance_id in {decision.prefill, decision.decode} - {None}:
            assert instance_id is not None
            self.instances[instance_id].pending += 1
        if decision.prefill is not None:
            target = self.instances[decision.prefill]
            record.overlapped = target.num_prefills > 0
            target.num_prefill_starts += 1
            record.prefill_starts = target.num_prefill_starts
            target.num_prefills += 1
            target.queued_prefill_tokens += uncached
            target.engine.add(
                SimSequence(n, request.input_tokens, 1, request.keys, hands_off=True), self.now
            )
        else:
            target = self.instances[decision.decode]
            target.num_prefills += 1
            target.num_prefill_starts += 1
            target.queued_prefill_tokens += uncached
            self._start_decode(target, record, request.input_tokens, request.output_tokens)
            target.engine.add(
                SimSequence(n, request.input_tokens, request.output_tokens, request.keys), self.now
            )
        self._wake(target, self._numbers[target.id])

    def _start_decode(
        self, instance: SimInstance, record: RequestRecord, context: int, remaining: int
    ) -> None:
        instance.running_decodes += 1
        instance.context_tokens += context
        instance.remaining_decode_tokens += remaining
        record.decode_context, record.decode_remaining = context, remaining
        record.decode_started_s = self.now

    def _step_end(self, instance: SimInstance, report: StepReport) -> None:
        for out in report.outputs:
            seq = out.sequence
            record = self.records[seq.request_id]
            if seq.hands_off:
                if out.new_tokens:
                    self._prefilled(instance, record, seq)
                continue
            if out.prompt_done and record.first_token_s is None:
                self._local_prefill_done(instance, record, seq)
            if out.new_tokens:
                self._decoded(instance, record, out.new_tokens)
            if out.finished:
                self._decode_done(instance, record)

    def _prefilled(self, instance: SimInstance, record: RequestRecord, seq: SimSequence) -> None:
        """The prefill's first token: its KV is saved; the decode instance takes over."""
        now = self.now
        request = self.requests[seq.request_id]
        record.cached_tokens = seq.hit_tokens + seq.loaded_tokens
        instance.num_prefills -= 1
        instance.queued_prefill_tokens -= record.uncached_tokens
        engine_s = now - seq.added_at
        solo = not record.overlapped and instance.num_prefill_starts == record.prefill_starts
        predictor = instance.predictor
        if solo:
            predictor.observe_prefill(
                request.input_tokens - record.cached_tokens, record.cached_tokens, engine_s
            )
        record.first_token_s = record.last_token_s = now
        record.num_tokens = 1
        ttft = now - record.arrival_s
        self.pools.first_token(ttft)
        predictor.observe_ttft_overhead(ttft - engine_s)
        predictor.observe_ttft(record.predicted_ttft_s, ttft, now)
        node = self.nodes.get(instance.host)
        if self._sync_save or node is None:  # saved within the step (or nothing to save)
            self._hand_off(seq.request_id)
        else:  # the save runs beside the engine; the decode can load once it is done
            self._push(now + self._saver(instance.id)(seq), _HANDOFF, seq.request_id)

    def _hand_off(self, n: int) -> None:
        """The prefill's KV is saved: in its host's store node, and to the decode instance."""
        request, record = self.requests[n], self.records[n]
        assert record.prefill is not None
        prefill = self.instances[record.prefill]
        prefill.pending -= 1  # its part ends once the KV is saved
        self.pools.maybe_stop(prefill, self.now)
        node = self.nodes.get(prefill.host)
        if node is not None:
            node.put(request.keys)
        assert record.decode is not None
        decode = self.instances[record.decode]
        if record.output_tokens == 1:
            decode.pending -= 1
            self.pools.finished(1, None)
            self.pools.maybe_stop(decode, self.now)
            return
        record.handoff = True
        self._start_decode(decode, record, request.input_tokens + 1, record.output_tokens - 1)
        decode.engine.add(
            SimSequence(n, request.input_tokens + 1, record.output_tokens - 1, request.keys),
            self.now,
        )
        self._wake(decode, self._numbers[decode.id])

    def _local_prefill_done(
        self, instance: SimInstance, record: RequestRecord, seq: SimSequence
    ) -> None:
        instance.num_prefills -= 1
        instance.queued_prefill_tokens -= record.uncached_tokens
        record.cached_tokens = seq.hit_tokens + seq.loaded_tokens
        node = self.nodes.get(instance.host)
        if node is not None and instance.role is WorkerRole.BOTH:  # it saved them (_saver)
            node.put(self.requests[seq.request_id].keys)
        ttft = self.now - record.arrival_s
        instance.predictor.observe_ttft(record.predicted_ttft_s, ttft, self.now)
        self.pools.first_token(ttft)

    def _decoded(self, instance: SimInstance, record: RequestRecord, tokens: int) -> None:
        now = self.now
        if record.first_token_s is None:
            record.first_token_s = now
        elif record.last_token_s is not None and (record.num_tokens > 1 or not record.handoff):
            # Gaps after the first chunk: the decode's steps (the hand-off's wait left out).
            record.gaps += tokens
            record.gap_s += now - record.last_token_s
            record.batch_sum += instance.running_decodes * tokens
            record.context_sum += instance.context_tokens * tokens
        elif record.handoff and record.handoff_first_s is None:
            record.handoff_first_s = now
        record.last_token_s = now
        record.num_tokens += tokens
        used = min(tokens, record.decode_remaining)
        record.decode_context += used
        record.decode_remaining -= used
        instance.context_tokens += used
        instance.remaining_decode_tokens -= used

    def _decode_done(self, instance: SimInstance, record: RequestRecord) -> None:
        if record.gaps >= 2:
            n = record.gaps
            step_s = record.gap_s / n
            instance.predictor.observe_decode_step(
                max(1, round(record.batch_sum / n)), round(record.context_sum / n), step_s
            )
            if record.handoff_first_s is not None:  # DecodeTracker.handoff_extra_s
                wait_s = record.handoff_first_s - record.decode_started_s
                instance.predictor.observe_handoff(wait_s - step_s)
        instance.running_decodes -= 1
        instance.context_tokens -= record.decode_context
        instance.remaining_decode_tokens -= record.decode_remaining
        instance.pending -= 1
        self.pools.finished(record.num_tokens, record.tpot_s if record.num_tokens > 1 else None)
