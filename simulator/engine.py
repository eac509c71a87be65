"""The engine model: one engine's continuous batching, step by step (docs/design/simulator.md §3).

:class:`SimEngine` restates vLLM v1's scheduler at the granularity that matters for latency:
a token budget per step, decodes first, then prompt chunks, then admissions in arrival order;
KV allocated in ``kv_block_tokens`` units out of ``hbm_kv_tokens``, recompute preemption of the
last admitted sequence when a decode finds no room; the engine's own prefix cache of whole
``cache_block_tokens`` blocks, published to the prefix index as an engine's HBM events are.

It owns no clock: the simulation loop calls :meth:`SimEngine.start_step` when the engine has
work and is idle, and :meth:`SimEngine.finish_step` at the time the step ends. Loads from the
KV pool and saves to it are timed by callbacks the loop gives (``load``: how many tokens after
the engine's own hits the pool has for a sequence being admitted, and the seconds to load them;
``save_s``). A synchronous load or save is part of the step (Strata's connector today: the
whole batch waits); an asynchronous load (``async_load``, vLLM's NIXL and Mooncake's
connectors) keeps the sequence out of the batches until it is done while the others step on.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.blocks.hashing import BlockKey
from simulator.profile import EngineProfile, attention_pairs

__all__ = ["SimEngine", "SimSequence", "StepOutput", "StepReport"]


@dataclass(slots=True, eq=False)
class SimSequence:
    """One request's work on one engine.

    ``prompt_tokens``: tokens whose KV must exist before the next token is sampled (a hand-off:
    the prompt plus the first token; after a preemption: everything so far). ``max_new_tokens``:
    tokens this engine samples (a prefill instance: 1). ``keys``: the prompt's whole cache
    blocks."""

    request_id: int
    prompt_tokens: int
    max_new_tokens: int
    keys: tuple[BlockKey, ...]
    computed: int = 0
    """Tokens with KV (hit, loaded or computed)."""
    sampled: int = 0
    """Tokens sampled since the prompt (as last reset by a preemption)."""
    emitted: int = 0
    """Tokens sampled on this engine in all (what the client has received from it)."""
    hit_tokens: int = 0
    loaded_tokens: int = 0
    private_tokens: int = 0
    """KV allocated to it alone (whole ``kv_block_tokens`` blocks)."""
    pinned: list[BlockKey] = field(default_factory=list)
    """Cache blocks it uses (shared, ref-counted)."""
    hands_off: bool = False
    """The loop's mark: a prefill whose first token hands the request to another instance."""
    added_at: float = 0.0
    ready_at: float = 0.0
    """An asynchronous load in progress until then: the sequence waits out of the batches."""
    allocated: bool = False
    """Admitted to the engine's KV (hits pinned, room taken); it may still be loading."""
    num_preemptions: int = 0

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.sampled

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_tokens

    @property
    def finished(self) -> bool:
        return self.emitted >= self.max_new_tokens


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one sequence got from a step: ``new_tokens`` sampled (0 or 1), ``prompt_done`` (its
    prompt's KV completed in this step), ``finished`` (it left the engine)."""

    sequence: SimSequence
    new_tokens: int
    prompt_done: bool
    finished: bool


@dataclass(frozen=True, slots=True)
class StepReport:
    """A finished step: its outputs and its shape (for the latency model's observations)."""

    started_at: float
    duration_s: float
    outputs: tuple[StepOutput, ...]
    prefill_tokens: int
    decode_sequences: int
    context_tokens: int
    load_s: float
    save_s: float


@dataclass(slots=True)
class _Planned:
    sequence: SimSequence
    chunk: int
    """Prompt tokens computed (prefill) or 1 (decode)."""
    decode: bool


class SimEngine:
    """One engine; see the module docstring. ``publish(stored, removed)``: the engine's HBM
    prefix-cache changes (keys cached, keys evicted), as its worker's events would report them.
    """

    def __init__(
        self,
        engine_id: str,
        profile: EngineProfile,
        *,
        kv_block_tokens: int,
        cache_block_tokens: int,
        load: Callable[[SimSequence, int, int], tuple[int, float]] | None = None,
        save_s: Callable[[SimSequence], float] | None = None,
        publish: Callable[[tuple[BlockKey, ...], tuple[BlockKey, ...]], None] | None = None,
        async_load: bool = False,
    ) -> None:
        if kv_block_tokens < 1 or cache_block_tokens < kv_block_tokens:
            raise ValueError("need 1 <= kv_block_tokens <= cache_block_tokens")
        if cache_block_tokens % kv_block_tokens:
            raise ValueError("cache_block_tokens must be a multiple of kv_block_tokens")
        self.engine_id = engine_id
        self.profile = profile
        self.kv_block_tokens = kv_block_tokens
        self.cache_block_tokens = cache_block_tokens
        self.capacity_tokens = profile.hbm_kv_tokens // kv_block_tokens * kv_block_tokens
        self._load = load
        self.async_load = async_load
        self._save_s = save_s
        self._publish = publish
        self.waiting: deque[SimSequence] = deque()
        self.running: list[SimSequence] = []
        self._refs: dict[BlockKey, int] = {}
        """Cache blocks in use, by how many running sequences use them."""
        self._free_cached: OrderedDict[BlockKey, None] = OrderedDict()
        """Cache blocks no sequence uses, least recently used first (evictable)."""
        self.used_tokens = 0
        self._plan: list[_Planned] = []
        self._aborted: set[int] = set()
        """Sequences of the running step aborted meanwhile (their request ids)."""
        self._step_started: float | None = None
        self._step_s = 0.0
        self._step_load_s = 0.0
        self._step_save_s = 0.0
        self.num_steps = 0
        self.num_preemptions = 0
        self.busy_s = 0.0
        self._now = 0.0

    # -- state ---------------------------------------------------------------------------------

    @property
    def stepping(self) -> bool:
        return self._step_started is not None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def held_tokens(self) -> int:
        """KV tokens sequences hold: what is allocated, less cache blocks no sequence uses
        (evictable on demand; vLLM counts them as free)."""
        return self.used_tokens - len(self._free_cached) * self.cache_block_tokens

    def next_ready_at(self) -> float | None:
        """When the first asynchronous load in progress ends (the loop wakes the engine then,
        if it is idle), or None."""
        loading = [s.ready_at for s in self.waiting if s.allocated and s.ready_at > self._now]
        return min(loading) if loading else None

    def cached_blocks(self, keys: tuple[BlockKey, ...]) -> int:
        """Leading blocks of ``keys`` in this engine's HBM (in use or cached)."""
        depth = 0
        for key in keys:
            if key not in self._refs and key not in self._free_cached:
                break
            depth += 1
        return depth

    # -- the loop's calls ----------------------------------------------------------------------

    def clear_cache(self) -> None:
        """The engine stops: its prefix cache goes (published as removed). Only when idle."""
        if self.has_work or self.stepping:
            raise RuntimeError(f"{self.engine_id} still has work")
        removed = tuple(self._free_cached)
        self._free_cached.clear()
        self.used_tokens = 0
        if removed and self._publish is not None:
            self._publish((), removed)

    def add(self, sequence: SimSequence, now: float) -> None:
        if sequence.prompt_tokens < 1 or sequence.max_new_tokens < 1:
            raise ValueError("a sequence needs a prompt and at least one token to sample")
        if sequence.prompt_tokens + sequence.max_new_tokens > self.capacity_tokens:
            raise ValueError(
                f"request {sequence.request_id} needs more KV than {self.engine_id} has"
            )
        sequence.added_at = now
        self.waiting.append(sequence)

    def abort(self, sequence: SimSequence) -> None:
        """``sequence`` leaves the engine unfinished (its client went away): its KV is freed
        now, or at the end of the step that is running if that step has it; then it is gone."""
        if any(item.sequence is sequence for item in self._plan):
            self._aborted.add(sequence.request_id)
            return
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        elif sequence in self.running:
            self.running.remove(sequence)
        if sequence.allocated:
            self._release(sequence)

    def start_step(self, now: float) -> float | None:
        """Compose the next step; its duration, or None with nothing to do."""
        if self._step_started is not None:
            raise RuntimeError(f"{self.engine_id} is already stepping")
        self._now = now
        plan = self._compose()
        if not plan:
            return None
        model = self.profile.step
        prefill = earlier = pairs = decodes = context = 0
        save_s = 0.0
        for item in plan:
            seq = item.sequence
            if item.decode:
                decodes += 1
                context += seq.context_tokens
            else:
                prefill += item.chunk
                earlier += seq.computed
                pairs += attention_pairs(item.chunk, seq.computed)
                if self._save_s is not None and seq.computed + item.chunk == seq.prompt_tokens:
                    save_s += self._save_s(seq)
        duration = model.step_s(prefill, earlier, pairs, decodes, context)
        duration += self._step_load_s + save_s
        self._plan = plan
        self._step_started = now
        self._step_s = duration
        self._step_save_s = save_s
        self._shape = (prefill, decodes, context)
        return duration

    def finish_step(self) -> StepReport:
        """Apply the step that is running (called at its end)."""
        started = self._step_started
        if started is None:
            raise RuntimeError(f"{self.engine_id} is not stepping")
        outputs: list[StepOutput] = []
        for item in self._plan:
            seq = item.sequence
            if seq.request_id in self._aborted:
                self._aborted.discard(seq.request_id)
                self.running.remove(seq)
                self._release(seq)
                continue
            prompt_done = False
            if item.decode:
                seq.sampled += 1
                seq.emitted += 1
                new = 1
            else:
                seq.computed += item.chunk
                new = 0
                if seq.computed == seq.prompt_tokens:
                    prompt_done = True
                    self._cache_prompt(seq)
                    seq.sampled += 1
                    seq.emitted += 1
                    new = 1
            done = seq.finished
            if done:
                self._release(seq)
                self.running.remove(seq)
            outputs.append(StepOutput(seq, new, prompt_done, done))
        prefill, decodes, context = self._shape
        report = StepReport(
            started,
            self._step_s,
            tuple(outputs),
            prefill,
            decodes,
            context,
            self._step_load_s,
            self._step_save_s,
        )
        self.num_steps += 1
        self.busy_s += self._step_s
        self._plan = []
        self._step_started = None
        self._step_load_s = 0.0
        return report

    # -- composition ---------------------------------------------------------------------------

    def _compose(self) -> list[_Planned]:
        budget = self.profile.max_num_batched_tokens
        plan: list[_Planned] = []
        self._step_load_s = 0.0
        index = 0
        preempted = False
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if seq.prefilling:
                chunk = min(seq.prompt_tokens - seq.computed, budget)
                plan.append(_Planned(seq, chunk, False))
                budget -= chunk
            else:
                if not self._grow(seq):
                    # No room for its next token: preempt from the back (maybe itself).
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                    continue  # try again with the room the victim left
                plan.append(_Planned(seq, 1, True))
                budget -= 1
            index += 1
        # vLLM admits nothing in a step that had to preempt. A sequence whose KV is still
        # arriving (an asynchronous load: vLLM's WAITING_FOR_REMOTE_KVS) holds its KV but stays
        # in the queue, skipped, and takes no sequence slot until the load is done.
        # Once one cannot be given room, only those that have theirs (loaded since) may pass
        # it: they hold KV that nothing else would free.
        skipped: list[SimSequence] = []
        full = False
        while (
            not (preempted and plan)  # a step that preempted everything admits, as the next would
            and self.waiting
            and budget > 0
            and len(self.running) < self.profile.max_num_seqs
        ):
            seq = self.waiting.popleft()
            if not seq.allocated and (full or not self._admit(seq)):
                full = True
                skipped.append(seq)
                continue
            if seq.ready_at > self._now:
                skipped.append(seq)
                continue
            self.running.append(seq)
            chunk = min(seq.prompt_tokens - seq.computed, budget)
            plan.append(_Planned(seq, chunk, False))
            budget -= chunk
        self.waiting.extendleft(reversed(skipped))  # back at the head, in their order
        return plan

    def _admit(self, seq: SimSequence) -> bool:
        """Prefix hits, pool loads and KV room for ``seq``'s prompt; False (nothing changed)
        when the room cannot be found."""
        cb = self.cache_block_tokens
        hit_blocks = min(self.cached_blocks(seq.keys), (seq.prompt_tokens - 1) // cb)
        hit_tokens = hit_blocks * cb
        need = _round_up(seq.prompt_tokens - hit_tokens, self.kv_block_tokens)
        hits = seq.keys[:hit_blocks]
        for key in hits:  # pinned first, so that making room cannot evict them
            self._pin(key)
        if not self._make_room(need):
            for key in hits:
                self._unpin(key)
            return False
        self.used_tokens += need
        seq.private_tokens = need
        seq.pinned = list(hits)
        seq.hit_tokens = hit_tokens
        loaded = 0
        limit = seq.prompt_tokens - 1 - hit_tokens  # the last token is always computed
        if self._load is not None and limit > 0:
            offered, seconds = self._load(seq, hit_tokens, limit)
            loaded = max(0, min(offered, limit))
            if loaded and self.async_load:
                seq.ready_at = self._now + seconds
            elif loaded:
                self._step_load_s += seconds
        seq.loaded_tokens = loaded
        seq.computed = hit_tokens + loaded
        seq.allocated = True
        return True

    def _grow(self, seq: SimSequence) -> bool:
        """Room for the KV of ``seq``'s last sampled token (computed in this decode step)."""
        have = len(seq.pinned) * self.cache_block_tokens + seq.private_tokens
        if seq.context_tokens <= have:
            return True
        if not self._make_room(self.kv_block_tokens):
            return False
        seq.private_tokens += self.kv_block_tokens
        self.used_tokens += self.kv_block_tokens
        return True

    def _preempt(self, seq: SimSequence) -> None:
        """vLLM's recompute preemption: free its KV, back to the head of the queue, its prompt
        now everything so far."""
        self.running.remove(seq)
        self._release(seq)
        seq.prompt_tokens = seq.context_tokens
        seq.sampled = 0
        seq.computed = 0
        seq.ready_at = 0.0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- memory --------------------------------------------------------------------------------

    def _make_room(self, tokens: int) -> bool:
        """Evict free cached blocks (least recently used first) until ``tokens`` fit (published
        as one removal); False, evicting nothing, when even evicting them all would not make
        the room (vLLM counts free plus evictable blocks first)."""
        evictable = len(self._free_cached) * self.cache_block_tokens
        if self.used_tokens - evictable + tokens > self.capacity_tokens:
            return False
        evicted: list[BlockKey] = []
        fits = True
        while self.used_tokens + tokens > self.capacity_tokens:
            if not self._free_cached:
                fits = False
                break
            key, _ = self._free_cached.popitem(last=False)
            self.used_tokens -= self.cache_block_tokens
            evicted.append(key)
        if evicted and self._publish is not None:
            self._publish((), tuple(evicted))
        return fits

    def _pin(self, key: BlockKey) -> None:
        refs = self._refs.get(key)
        if refs is None:
            del self._free_cached[key]
            self._refs[key] = 1
        else:
            self._refs[key] = refs + 1

    def _unpin(self, key: BlockKey) -> None:
        refs = self._refs[key] - 1
        if refs:
            self._refs[key] = refs
        else:
            del self._refs[key]
            self._free_cached[key] = None  # most recently used

    def _cache_prompt(self, seq: SimSequence) -> None:
        """The prompt's whole blocks become cache blocks of this engine (shared from now on);
        their room moves from the sequence's own to the cache's."""
        cb = self.cache_block_tokens
        whole = min(len(seq.keys), seq.prompt_tokens // cb)
        stored: list[BlockKey] = []
        for key in seq.keys[len(seq.pinned) : whole]:
            if key in self._refs or key in self._free_cached or seq.private_tokens < cb:
                continue  # cached meanwhile by another sequence: this copy stays private
            self._refs[key] = 1
            seq.pinned.append(key)
            seq.private_tokens -= cb
            stored.append(key)
        if stored and self._publish is not None:
            self._publish(tuple(stored), ())

    def _release(self, seq: SimSequence) -> None:
        seq.allocated = False
        for key in seq.pinned:
            self._unpin(key)
        seq.pinned = []
        self.used_tokens -= seq.private_tokens
        seq.private_tokens = 0


def _round_up(tokens: int, unit: int) -> int:
    return -(-tokens // unit) * unit
