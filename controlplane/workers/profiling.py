"""The start-up profile of one worker: real Prefill/Decode calls that calibrate its latency model.

When an instance turns ready the registry runs :func:`profile_worker` in the background (the
instance is scheduled with a sibling's profile or the priors until it lands;
docs/design/scheduling.md §2.3, §7). The points come from :meth:`ProfilePlan.for_engine`, bounded
by :class:`ProfileSettings` so that a long context or a big batch does not make the profile itself
a load test: cheapest point first, no call predicted above ``max_step_s``, nothing that would end
after ``budget_s``, its calls at most ``max_share`` of the engine's time (it pauses between them),
and every call waits until the instance runs no client request (``yield_to``), so a client
waits behind the profile for one call at most.

* **Prefill** points ``(new n, cached c)``: a fresh random prompt of ``c + n`` tokens; when
  ``c > 0`` its first ``c`` tokens are run first, so the engine's prefix cache (or the KV pool)
  holds them. The sample uses what the engine reports: ``num_cached_tokens`` (the cached count
  actually hit) and ``engine_time_s`` (no gateway or RPC time). A decode-role worker has no
  Prefill rpc: it is timed as a Decode of one token (what a local route costs it), wall time at
  the gateway.
* **Decode** points ``(batch b, context k)``: ``b`` prompts of ``k / b`` tokens run first with
  one token each (so that the engine's prefix cache holds them), then ``b`` concurrent Decode
  streams of the same prompts, ``decode_tokens`` greedy tokens (EOS ignored); the sample is the
  mean gap between chunks once every stream has its first token (steps with no prefill left in
  them; if none, every gap after each stream's first), at the mean context over those steps.
* A prefill-role worker never decodes for the gateway: its decode model keeps the priors (the
  samples given to the fit are the prior's own predictions at the plan's points).
* **Overheads** that the engine's time leaves out (docs/design/scheduling.md §2.2): on a
  prefill worker, the rpc's wall time minus ``engine_time_s`` (median over the prefill points)
  seeds ``ttft_overhead_s``; on a decode worker, each hand-off point ``(tail n, cached c)``
  runs ``c`` tokens, then ``c + n`` tokens for ``HANDOFF_DECODE_TOKENS`` tokens: the first
  chunk's wait minus its tokens' share of the later steps (median) seeds ``handoff_s``. Both
  are lower bounds (no HTTP, no pool load) that the gateway's observations replace.

Synthetic prompts are random token ids (seeded per instance and round) so that they share no
prefix with real traffic or with each other.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Final

from controlplane.api.sampling import SamplingOptions
from controlplane.scheduling.predictor.fitting import DecodeSample, PrefillSample
from controlplane.scheduling.predictor.plan import HANDOFF_DECODE_TOKENS, ProfilePlan
from controlplane.scheduling.predictor.plausibility import PlausibilityBounds
from controlplane.scheduling.predictor.predictor import LatencyPredictor
from controlplane.workers.client import PrefillResult, WorkerClient, WorkerSampling
from controlplane.workers.roles import WorkerRole
from strata_common.options import option
from strata_common.units import parse_duration

__all__ = ["ProfileResult", "ProfileSettings", "plan_context", "plan_for", "profile_worker"]

_FIRST_TOKEN_ID: Final = 10
"""Synthetic prompts avoid the lowest ids (special tokens in most vocabularies)."""
_PROFILE_SAMPLING: Final = SamplingOptions.greedy(None, ignore_eos=True)
"""Greedy and never stopping early: every timed call generates exactly what it asks for."""


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    """Bounds of the start-up profile (the gateway's ``--profile*`` flags)."""

    enabled: bool = option(
        True,
        flag="--profile",
        negative_flag="--no-profile",
        negative_help="do not profile workers as they become ready (same as --profile false)",
        help="time a short profile on each worker that becomes ready (calibrates its model)",
    )
    max_model_len: int = option(
        1024, help="longest prompt + output the profile uses (caps its cost on big contexts)"
    )
    max_batch: int = option(8, help="largest decode batch the profile runs")
    repeats: int = option(1, help="times each point of the profile is run")
    decode_tokens: int = 8
    vocab_size: int = 0
    """Token ids are drawn below this (0 = the profile cannot run: no vocabulary known)."""
    timeout_s: float = 30.0
    """Deadline of each call of the profile; no call's deadline is later than ``max_step_s``
    past the end of ``budget_s``, so a stalled engine holds the profile that long at most."""
    budget_s: float = option(
        40.0,
        parse=parse_duration,
        help="wall-clock bound of each worker's start-up profile, e.g. 40s",
    )
    """Wall-clock bound of the whole profile, waits for client requests included: a point whose
    predicted time does not fit what is left is skipped, and the profile ends when none fits."""
    max_step_s: float = option(
        2.0,
        parse=parse_duration,
        help="longest predicted call of the profile (a client waits at most this behind it)",
    )
    """Longest predicted time of one call of the profile: points with a longer call are skipped,
    so that a client request never waits behind the profile for longer than that."""

    max_share: float = option(
        0.5,
        help="largest share of the engine's time the profile's calls take (0.5: after a call "
        "of t seconds the engine is left to client requests for t seconds)",
    )
    """Bound on the profile's load: its calls take at most this share of the time since it
    started (pauses between calls make up the rest), so a client request arriving during the
    profile finds the engine free at least ``1 - max_share`` of the time."""
    sibling_factor: float = option(
        3.0,
        help="a profile predicting more than this factor from its siblings' (same role, model "
        "and hardware) at any profiled point is rejected",
    )
    observed_factor: float = option(
        3.0,
        help="a profile whose predictions are off the instance's and its siblings' observed "
        "prefills or decode steps by more than this factor (median) is rejected",
    )
    concurrency: int = option(
        4,
        help="start-up profiles run at once; the others wait, and one that waits starts with a "
        "sibling's profile (same role, model and hardware) as soon as one is done",
    )
    """At 256 instances starting together, profiling them all at once loads the gateway's event
    loop (and workers sharing a host) so much that every call runs slow: the profiles came out
    6-8x too slow or were rejected as non-physical (docs/benchmarks.md, "Gateway at scale")."""
    max_fit_error: float = 0.5
    """A profile whose fit misses its own points by more than this (median relative residual)
    is rejected as non-physical (random timings)."""

    def plausibility(self) -> PlausibilityBounds:
        """The checks a profile passes before it replaces a model."""
        return PlausibilityBounds(
            sibling_factor=self.sibling_factor,
            observed_factor=self.observed_factor,
            max_fit_error=self.max_fit_error,
        )

    def __post_init__(self) -> None:
        if not (self.timeout_s > 0 and self.budget_s > 0 and self.max_step_s > 0):
            raise ValueError("profile timeout_s, budget_s and max_step_s must be > 0")
        if not 0.0 < self.max_share <= 1.0:
            raise ValueError("profile max_share must be in (0, 1]")
        if not (self.sibling_factor > 1.0 and self.observed_factor > 1.0):
            raise ValueError("profile sibling_factor and observed_factor must be > 1")
        if self.concurrency < 1:
            raise ValueError(f"profile concurrency must be >= 1, got {self.concurrency}")
        if self.max_model_len < 4 or self.max_batch < 1 or self.repeats < 1:
            raise ValueError(
                "need profile_max_model_len >= 4, profile_max_batch >= 1, profile_repeats >= 1"
            )


@dataclass(frozen=True, slots=True)
class ProfileResult:
    prefill: tuple[PrefillSample, ...]
    decode: tuple[DecodeSample, ...]
    seconds: float
    ttft_overhead_s: float | None = None
    """Median rpc wall time minus engine time of the Prefill calls (prefill role)."""
    handoff_s: float | None = None
    """Median hand-off cost beyond the steps (decode role, when the plan has hand-off points)."""
    num_skipped: int = 0
    """Points of the plan not run: predicted too long for a step or for the budget left."""
    waited_s: float = 0.0
    """Time spent waiting for client requests to finish before the profile's calls."""
    paused_s: float = 0.0
    """Time spent pausing between calls to keep the profile's share of the engine (``max_share``):
    its calls took ``seconds - waited_s - paused_s``."""
    num_prefill_measured: int = 0
    """Prefill points that ran and were timed."""
    measured_prefill: bool = True
    """False when fewer than 4 prefill points ran: ``prefill`` then holds the base model's
    predictions at the plan's points, scaled by the median observed/predicted ratio."""
    measured_decode: bool = True
    """False when ``decode`` holds the base model's step predictions (scaled by the measured
    ratio, if any decode point ran), not measurements: a prefill worker, or fewer than 3 decode
    points ran."""


YieldTo = Callable[[float], Awaitable[bool]]
"""``await yield_to(timeout_s)``: returns once the instance runs no client request (True), or
False when ``timeout_s`` passed first. Called before every call of the profile."""


def plan_for(
    settings: ProfileSettings, max_model_len: int, block_size: int, capacity: int
) -> ProfilePlan:
    """The engine's plan, within the settings' bounds (context, batch, repeats)."""
    context = min(max_model_len, settings.max_model_len)
    plan = ProfilePlan.for_engine(context, block_size, max(1, min(capacity, settings.max_batch)))
    return replace(plan, repeats=settings.repeats)


class _Kind(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    HANDOFF = "handoff"


class _Costs:
    """Predicted time of each call of a point: the base model (priors or a sibling's profile)
    times the median ratio observed/predicted of the calls measured so far (per kind: prefill
    time and decode step time), and a prefill never below the highest time per new token
    measured, so the bounds hold on a host far slower or faster than the priors assume."""

    def __init__(self, base: LatencyPredictor, decode_tokens: int) -> None:
        self._prefill = base.prefill_fit
        self._step = base.decode_fit
        self._decode_tokens = decode_tokens
        self._prefill_ratios: list[float] = []
        self._step_ratios: list[float] = []
        self._per_new_token_s = 0.0
        """Highest time per new token measured: a floor under every prefill prediction (the
        base model's shape can be far off, e.g. priors whose fixed cost hides the per-token
        cost of a slow host)."""

    def prefill_s(self, new: int, cached: int) -> float:
        scale = statistics.median(self._prefill_ratios) if self._prefill_ratios else 1.0
        return max(self._prefill.predict_s(new, cached) * scale, self._per_new_token_s * new)

    def step_s(self, batch: int, context: int) -> float:
        scale = statistics.median(self._step_ratios) if self._step_ratios else 1.0
        return self._step.predict_s(batch, context) * scale

    def observe_prefill(self, sample: PrefillSample) -> None:
        predicted = self._prefill.predict_s(sample.new_tokens, sample.cached_tokens)
        if predicted > 0:
            self._prefill_ratios.append(sample.seconds / predicted)
        if sample.new_tokens > 0:
            self._per_new_token_s = max(self._per_new_token_s, sample.seconds / sample.new_tokens)

    def observe_step(self, sample: DecodeSample) -> None:
        predicted = self._step.predict_s(sample.batch_size, sample.context_tokens)
        if predicted > 0:
            self._step_ratios.append(sample.seconds / predicted)

    def calls_s(self, kind: _Kind, point: tuple[int, int], context_limit: int) -> list[float]:
        """Predicted seconds of each call the point makes (see :class:`_Profiler`)."""
        if kind is _Kind.PREFILL:
            new, cached = point
            warm = [self.prefill_s(cached, 0)] if cached else []
            return [*warm, self.prefill_s(new, cached)]
        if kind is _Kind.HANDOFF:
            new, cached = point
            steps = HANDOFF_DECODE_TOKENS * self.step_s(1, cached + new)
            return [
                self.prefill_s(cached, 0) + self.step_s(1, cached),
                self.prefill_s(new, cached) + steps,
            ]
        batch, context = point
        tokens = self._decode_tokens
        per_sequence = _per_sequence(batch, context, tokens, context_limit)
        prompts = batch * self.prefill_s(per_sequence, 0)
        tails = batch * self.prefill_s(1, per_sequence - 1)  # the cached prompts' last token
        return [prompts, tails + tokens * self.step_s(batch, batch * (per_sequence + tokens))]


def _per_sequence(batch: int, context: int, tokens: int, context_limit: int) -> int:
    """Prompt tokens of each stream of a decode point."""
    return max(1, min(context // batch, context_limit - tokens - 1))


async def profile_worker(
    client: WorkerClient,
    role: WorkerRole,
    plan: ProfilePlan,
    settings: ProfileSettings,
    *,
    seed: int,
    base: LatencyPredictor | None = None,
    yield_to: YieldTo | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    context_limit: int | None = None,
) -> ProfileResult:
    """Time ``plan`` on the worker behind ``client``, within the settings' bounds.

    Cheapest point first (predicted from ``base``, the instance's current model, scaled by what
    the calls measured so far); a point with a call predicted above ``max_step_s``, or that would
    not end within ``budget_s`` of the start, is skipped; before every call the profile pauses
    (``sleep``) as long as it takes for its calls to stay within ``max_share`` of the time since
    its start, then ``yield_to`` lets the instance's client requests finish first (pauses and
    waits count against the budget). ``context_limit``: the longest prompt + output of a decode
    stream (default: the plan's, from its prefill points). Raises WorkerError if a call fails.
    """
    started = clock()
    deadline = started + settings.budget_s
    base = base if base is not None else LatencyPredictor()
    costs = _Costs(base, settings.decode_tokens)
    profiler = _Profiler(client, settings, seed, clock, deadline)
    context_limit = context_limit if context_limit is not None else plan_context(plan)
    pending: list[tuple[_Kind, tuple[int, int]]] = []
    for _ in range(plan.repeats):
        pending += [(_Kind.PREFILL, point) for point in plan.prefill_points]
        if role is not WorkerRole.PREFILL:
            pending += [(_Kind.DECODE, point) for point in plan.decode_points]
            pending += [(_Kind.HANDOFF, point) for point in plan.handoff_points]
    prefill: list[PrefillSample] = []
    decode: list[DecodeSample] = []
    handoffs: list[float] = []
    waited_s = 0.0
    paused_s = 0.0

    def owed_s() -> float:
        """The pause due before the next call: the calls so far (the time not spent waiting or
        pausing) take at most max_share of the time since the start (the load bound)."""
        elapsed = clock() - started
        busy = elapsed - waited_s - paused_s
        return max(0.0, busy / settings.max_share - elapsed)

    async def gate() -> bool:
        nonlocal waited_s, paused_s
        pause = min(owed_s(), deadline - clock())
        if pause > 0.0:
            before = clock()
            await sleep(pause)
            paused_s += clock() - before
        if yield_to is None:
            return True
        before = clock()
        ok = await yield_to(max(0.0, deadline - before))
        waited_s += clock() - before
        return ok

    # The first call of a fresh engine pays one-time costs (lazy initialisation, the KV
    # connector's first connection): one untimed call first, or it would set the speed
    # estimate and skip points that fit.
    smallest = min(n for n, _ in plan.prefill_points)
    await profiler.prefill_point(role, (smallest, 0), gate)
    while pending and not profiler.stopped:
        left_s = deadline - clock() - owed_s()
        best: tuple[float, int] | None = None
        for index, (kind, point) in enumerate(pending):
            calls = costs.calls_s(kind, point, context_limit)
            total = sum(calls) / settings.max_share  # the calls and the pauses they cost
            if (
                max(calls) <= settings.max_step_s
                and total <= left_s
                and (best is None or total < best[0])
            ):
                best = (total, index)
        if best is None:
            break
        kind, point = pending.pop(best[1])
        if kind is _Kind.PREFILL:
            sample = await profiler.prefill_point(role, point, gate)
            if sample is not None:
                prefill.append(sample)
                costs.observe_prefill(sample)
        elif kind is _Kind.DECODE:
            step = await profiler.decode(*point, context_limit, gate)
            if step is not None:
                decode.append(step)
                costs.observe_step(step)
        else:
            extra_s = await profiler.handoff(*point, gate)
            if extra_s is not None:
                handoffs.append(extra_s)
    if not prefill:
        raise ValueError(
            f"no profile point ran within {settings.budget_s:g} s "
            f"({'client traffic first' if profiler.stopped else 'every point too long'})"
        )
    num_prefill_measured = len(prefill)
    measured_prefill = num_prefill_measured >= 4
    if not measured_prefill:
        # Too few points for a fit: the base model's shape, at the speed the points measured.
        prefill = [PrefillSample(n, c, costs.prefill_s(n, c)) for n, c in plan.prefill_points]
    measured_decode = role is not WorkerRole.PREFILL and len(decode) >= 3
    if not measured_decode:
        decode = [DecodeSample(b, k, costs.step_s(b, k)) for b, k in plan.decode_points]
    overheads = profiler.rpc_overheads_s
    return ProfileResult(
        tuple(prefill),
        tuple(decode),
        clock() - started,
        ttft_overhead_s=statistics.median(overheads) if overheads else None,
        handoff_s=statistics.median(handoffs) if handoffs else None,
        num_skipped=len(pending) + profiler.num_interrupted,
        waited_s=waited_s,
        paused_s=paused_s,
        num_prefill_measured=num_prefill_measured,
        measured_prefill=measured_prefill,
        measured_decode=measured_decode,
    )


def plan_context(plan: ProfilePlan) -> int:
    """The context the plan was made for (its longest prefill prompt + 1)."""
    return max(n + c for n, c in plan.prefill_points) + 1


Gate = Callable[[], Awaitable[bool]]


class _Profiler:
    """Runs the calls of each point; every call first passes the gate (client requests first).
    A gate that says no stops the profile (:attr:`stopped`): the point is dropped."""

    __slots__ = (
        "_client",
        "_clock",
        "_count",
        "_deadline",
        "_random",
        "_settings",
        "num_interrupted",
        "rpc_overheads_s",
        "stopped",
    )

    def __init__(
        self,
        client: WorkerClient,
        settings: ProfileSettings,
        seed: int,
        clock: Callable[[], float],
        deadline: float,
    ) -> None:
        if settings.vocab_size <= _FIRST_TOKEN_ID + 1:
            raise ValueError("the profile needs the vocabulary size")
        self._client = client
        self._settings = settings
        self._random = random.Random(seed)
        self._clock = clock
        self._deadline = deadline
        self._count = 0
        self.rpc_overheads_s: list[float] = []
        """Wall time minus engine time of each timed Prefill call."""
        self.stopped = False
        self.num_interrupted = 0

    async def _pass(self, gate: Gate) -> bool:
        if self.stopped or not await gate():
            if not self.stopped:
                self.num_interrupted += 1
            self.stopped = True
            return False
        return True

    def _timeout_s(self) -> float:
        """Deadline of the next call: ``timeout_s``, and no later than ``max_step_s`` past the
        profile's budget (a stalled engine does not hold the profile, or its slot, for long)."""
        left_s = max(0.0, self._deadline - self._clock())
        return min(self._settings.timeout_s, left_s + self._settings.max_step_s)

    def _prompt(self, num_tokens: int) -> list[int]:
        randrange = self._random.randrange
        high = self._settings.vocab_size
        return [randrange(_FIRST_TOKEN_ID, high) for _ in range(num_tokens)]

    def _request_id(self) -> str:
        self._count += 1
        return f"strata-profile-{self._random.getrandbits(48):012x}-{self._count}"

    def _sampling(self, max_tokens: int) -> WorkerSampling:
        return WorkerSampling(max_tokens, _PROFILE_SAMPLING)

    async def prefill_point(
        self, role: WorkerRole, point: tuple[int, int], gate: Gate
    ) -> PrefillSample | None:
        new, cached = point
        if role is WorkerRole.PREFILL:
            return await self.prefill(new, cached, gate)
        return await self.local_prefill(new, cached, gate)

    async def prefill(self, new: int, cached: int, gate: Gate) -> PrefillSample | None:
        prompt = self._prompt(new + cached)
        if cached:
            if not await self._pass(gate):
                return None
            await self._run_prefill(prompt[:cached])
        if not await self._pass(gate):
            return None
        start = self._clock()
        result = await self._run_prefill(prompt)
        wall_s = self._clock() - start
        hit = min(result.num_cached_tokens, len(prompt) - 1)
        seconds = result.engine_time_s
        if 0.0 < seconds <= wall_s:
            self.rpc_overheads_s.append(wall_s - seconds)
        return PrefillSample(len(prompt) - hit, hit, seconds if seconds > 0 else 1e-6)

    async def _run_prefill(self, prompt: Sequence[int]) -> PrefillResult:
        return await self._client.prefill(
            request_id=self._request_id(),
            prompt_token_ids=prompt,
            sampling=self._sampling(1),
            cache_salt="",
            timeout_s=self._timeout_s(),
        )

    async def local_prefill(self, new: int, cached: int, gate: Gate) -> PrefillSample | None:
        prompt = self._prompt(new + cached)
        if cached:
            if not await self._pass(gate):
                return None
            await self._run_decode(prompt[:cached], 1)
        if not await self._pass(gate):
            return None
        start = self._clock()
        times, num_cached = await self._run_decode(prompt, 1)
        if not times:
            return None
        hit = min(num_cached, len(prompt) - 1)
        return PrefillSample(len(prompt) - hit, hit, max(1e-6, times[0] - start))

    async def handoff(self, new: int, cached: int, gate: Gate) -> float | None:
        """A decode of ``cached + new`` tokens whose first ``cached`` are cached: first-chunk
        wait minus its tokens' share of the later steps (None if too few tokens came)."""
        prompt = self._prompt(new + cached)
        if not await self._pass(gate):
            return None
        await self._run_decode(prompt[:cached], 1)
        if not await self._pass(gate):
            return None
        counts: list[int] = []
        start = self._clock()
        times, _ = await self._run_decode(prompt, HANDOFF_DECODE_TOKENS, counts)
        later = sum(counts[1:])
        if later < 2:
            return None
        step_s = (times[-1] - times[0]) / later
        return (times[0] - start) - counts[0] * step_s

    async def _run_decode(
        self, prompt: Sequence[int], max_tokens: int, counts: list[int] | None = None
    ) -> tuple[list[float], int]:
        """Chunk arrival times (one per chunk with tokens) and the reported cached tokens;
        ``counts`` receives each such chunk's number of tokens."""
        times: list[float] = []
        num_cached = 0
        stream = self._client.decode(
            request_id=self._request_id(),
            prompt_token_ids=prompt,
            sampling=self._sampling(max_tokens),
            cache_salt="",
            block_keys=(),
            timeout_s=self._timeout_s(),
        )
        async for chunk in stream:
            if chunk.token_ids:
                times.append(self._clock())
                if counts is not None:
                    counts.append(len(chunk.token_ids))
            num_cached = max(num_cached, chunk.num_cached_tokens)
        return times, num_cached

    async def decode(
        self, batch: int, context: int, context_limit: int, gate: Gate
    ) -> DecodeSample | None:
        tokens = self._settings.decode_tokens
        per_sequence = _per_sequence(batch, context, tokens, context_limit)
        prompts = [self._prompt(per_sequence) for _ in range(batch)]
        # The prompts first, one token each: the timed streams then find them in the engine's
        # prefix cache and start decoding within a step or two of each other, instead of
        # decoding beside the later streams' (chunked) prefills.
        if not await self._pass(gate):
            return None
        await asyncio.gather(*(self._run_decode(p, 1) for p in prompts))
        if not await self._pass(gate):
            return None
        runs = await asyncio.gather(*(self._run_decode(p, tokens) for p in prompts))
        # Steps once every stream has its first token: no prefill left in them.
        started = max((times[0] for times, _ in runs if times), default=0.0)
        pairs = [(a, b) for times, _ in runs for a, b in itertools.pairwise(times[1:])]
        gaps = [b - a for a, b in pairs if a >= started] or [b - a for a, b in pairs]
        mean_gap_s = sum(gaps) / len(gaps) if gaps else 0.0
        if mean_gap_s <= 0.0:
            return None
        # Over the timed steps each sequence holds its prompt plus 1.5 .. n generated tokens.
        mean_generated = (1 + tokens) / 2.0 + 0.5
        context_tokens = round(batch * (per_sequence + mean_generated))
        return DecodeSample(batch, context_tokens, mean_gap_s)
