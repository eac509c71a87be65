"""The start-up profile's bounds, on a simulated engine with a fake clock: cheapest points first,
no call predicted above the step bound, the whole profile within its budget, a gate before every
call, and a scaled model when too few points fit."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from controlplane.scheduling.predictor.model import PrefillCoefficients
from controlplane.scheduling.predictor.predictor import LatencyPredictor
from controlplane.workers.client import (
    DecodeOutput,
    FinishReason,
    PrefillResult,
    WorkerError,
    WorkerErrorKind,
    WorkerSampling,
)
from controlplane.workers.profiling import ProfileResult, ProfileSettings, plan_for, profile_worker
from controlplane.workers.roles import WorkerRole
from tests.fakes import FakeClock

BLOCK = 16
PER_TOKEN_S = 0.010
"""The simulated engine: 10 ms per new prompt token, 1 ms per cached one, 20 ms per step."""
PER_CACHED_S = 0.001
STEP_S = 0.020


@dataclass
class SimulatedEngine:
    """A WorkerClient double whose calls take simulated time on ``clock``; its prefix cache
    holds every prompt it ran, in whole blocks."""

    clock: FakeClock
    calls: list[tuple[str, int]] = field(default_factory=list)
    seen: list[tuple[int, ...]] = field(default_factory=list)
    deadlines: list[float] = field(default_factory=list)
    """When each call's timeout would end it."""
    stall_after: int | None = None
    """Calls after which the engine stops making progress: a call then runs into its timeout."""

    def _start(self, kind: str, prompt: Sequence[int], timeout_s: float) -> None:
        self.calls.append((kind, len(prompt)))
        self.deadlines.append(self.clock.now + timeout_s)
        if self.stall_after is not None and len(self.calls) > self.stall_after:
            self.clock.now += timeout_s
            raise WorkerError(WorkerErrorKind.TIMEOUT, "sim", kind, "deadline exceeded")

    def _cached(self, prompt: Sequence[int]) -> int:
        best = 0
        for old in self.seen:
            common = 0
            for a, b in zip(old, prompt, strict=False):
                if a != b:
                    break
                common += 1
            best = max(best, common // BLOCK * BLOCK)
        return min(best, len(prompt) - 1)

    def _prefill_s(self, prompt: Sequence[int]) -> tuple[float, int]:
        cached = self._cached(prompt)
        self.seen.append(tuple(prompt))
        return (len(prompt) - cached) * PER_TOKEN_S + cached * PER_CACHED_S, cached

    async def prefill(
        self,
        *,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: WorkerSampling,
        cache_salt: str,
        timeout_s: float,
    ) -> PrefillResult:
        self._start("prefill", prompt_token_ids, timeout_s)
        seconds, cached = self._prefill_s(prompt_token_ids)
        self.clock.now += seconds
        await asyncio.sleep(0)
        return PrefillResult(1, "", None, (), len(prompt_token_ids), cached, seconds)

    async def decode(
        self,
        *,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: WorkerSampling,
        cache_salt: str,
        block_keys: Sequence[bytes],
        timeout_s: float,
    ) -> AsyncGenerator[DecodeOutput, None]:
        self._start("decode", prompt_token_ids, timeout_s)
        seconds, cached = self._prefill_s(prompt_token_ids)
        self.clock.now += seconds
        for index in range(sampling.max_tokens):
            if index:
                self.clock.now += STEP_S
            await asyncio.sleep(0)
            last = index == sampling.max_tokens - 1
            finish = FinishReason.LENGTH if last else None
            yield DecodeOutput((7,), "", finish, num_cached_tokens=cached, num_external_tokens=0)


def settings(**kwargs: float) -> ProfileSettings:
    return ProfileSettings(
        max_model_len=256, max_batch=4, decode_tokens=4, vocab_size=1000, **kwargs
    )


def exact_base() -> LatencyPredictor:
    """A base model that predicts the simulated engine's prefill exactly."""
    return LatencyPredictor(prefill=PrefillCoefficients(0.0, PER_TOKEN_S, PER_CACHED_S, 0.0))


PLAN = plan_for(settings(), 256, BLOCK, 4)


def run_profile(
    role: WorkerRole,
    config: ProfileSettings,
    stall_after: int | None = None,
    engines: list[SimulatedEngine] | None = None,
    **kwargs: Any,
) -> tuple[SimulatedEngine, ProfileResult]:
    clock = FakeClock()
    engine = SimulatedEngine(clock, stall_after=stall_after)
    if engines is not None:
        engines.append(engine)
    client: Any = engine

    async def sleep(seconds: float) -> None:
        clock.now += seconds
        await asyncio.sleep(0)

    async def main() -> ProfileResult:
        return await profile_worker(
            client, role, PLAN, config, seed=1, clock=clock, sleep=sleep, **kwargs
        )

    return engine, asyncio.run(main())


def test_without_bounds_in_reach_every_point_runs_cheapest_first() -> None:
    engine, result = run_profile(WorkerRole.PREFILL, settings(budget_s=1e6, max_step_s=1e6))
    assert result.num_skipped == 0
    assert len(result.prefill) == len(PLAN.prefill_points)
    # Cheapest first: the timed calls (the last of each point) grow.
    timed = [n for kind, n in engine.calls if kind == "prefill"]
    assert timed[0] == BLOCK and max(timed) == 255


def test_no_call_is_predicted_above_the_step_bound() -> None:
    # 10 ms per token: a 1 s step allows prompts of at most 100 new tokens.
    engine, result = run_profile(
        WorkerRole.PREFILL, settings(budget_s=1e6, max_step_s=1.0), base=exact_base()
    )
    assert max(n for _, n in engine.calls) <= 100 + 3 * BLOCK  # cached tokens cost 1 ms
    assert result.num_skipped > 0
    assert all(s.seconds <= 1.0 for s in result.prefill)


def test_the_whole_profile_ends_within_its_budget() -> None:
    _, unbounded = run_profile(
        WorkerRole.DECODE, settings(budget_s=1e6, max_step_s=1e6), base=exact_base()
    )
    assert unbounded.seconds > 5.0 and unbounded.num_skipped == 0
    _engine, result = run_profile(
        WorkerRole.DECODE, settings(budget_s=5.0, max_step_s=1e6, max_share=1.0), base=exact_base()
    )
    assert result.seconds <= 5.0 and result.paused_s == 0.0
    assert result.num_skipped > 0
    assert len(result.prefill) >= 4 and result.measured_prefill


def test_a_decode_point_runs_its_prompts_first_and_times_the_steps_after() -> None:
    """Each decode point's prompts run once with one token, then again timed: the timed
    streams hit the engine's prefix cache, so their steps hold no prefill: a batch's step time
    does not grow with its prompts (10 ms per uncached token here)."""
    engine, result = run_profile(
        WorkerRole.DECODE, settings(budget_s=1e6, max_step_s=1e6), base=exact_base()
    )
    assert result.measured_decode and result.num_skipped == 0
    runs: dict[tuple[int, ...], int] = {}
    for prompt in engine.seen:
        runs[prompt] = runs.get(prompt, 0) + 1
    twice = [prompt for prompt, count in runs.items() if count == 2]
    assert max(runs.values()) == 2
    assert len(twice) == sum(s.batch_size for s in result.decode)
    by_batch: dict[int, set[float]] = {}
    for sample in result.decode:
        by_batch.setdefault(sample.batch_size, set()).add(round(sample.seconds, 9))
    assert set(by_batch) == {1, 2, 4} and all(len(times) == 1 for times in by_batch.values())
    assert by_batch[1] == {STEP_S}


def test_the_scale_learned_from_the_first_calls_bounds_the_rest() -> None:
    """Priors ~60x too fast (an H100 model on a CPU): once the first call measured the real
    speed, no call goes past the step bound (but for the cached tokens' share, which the
    per-new-token floor leaves out)."""
    _engine, result = run_profile(WorkerRole.PREFILL, settings(budget_s=1e6, max_step_s=1.0))
    assert result.prefill[0].seconds == pytest.approx(BLOCK * PER_TOKEN_S)  # cheapest first
    for sample in result.prefill:
        assert sample.new_tokens * PER_TOKEN_S <= 1.0
        assert sample.seconds <= 1.0 + sample.cached_tokens * PER_CACHED_S
    assert result.num_skipped > 0


def test_every_call_waits_for_the_gate_and_a_closed_gate_ends_the_profile() -> None:
    opened: list[float] = []

    async def yield_to(timeout_s: float) -> bool:
        opened.append(timeout_s)
        return len(opened) <= 3

    engine, result = run_profile(
        WorkerRole.PREFILL, settings(budget_s=1e6, max_step_s=1e6), yield_to=yield_to
    )
    assert len(opened) == 4  # three calls let through, the fourth gate closed
    assert len(engine.calls) == 3  # the untimed warm-up call, then the two cheapest points
    assert [n for _, n in engine.calls] == [BLOCK, BLOCK, 2 * BLOCK]
    assert result.num_skipped == len(PLAN.prefill_points) - 2
    assert not result.measured_prefill


def test_too_few_points_give_the_base_model_scaled_to_the_measured_speed() -> None:
    # The base predicts half the engine's time; two points fit the budget.
    base = LatencyPredictor(
        prefill=PrefillCoefficients(0.0, PER_TOKEN_S / 2, PER_CACHED_S / 2, 0.0)
    )
    _engine, result = run_profile(
        WorkerRole.PREFILL, settings(budget_s=0.5, max_step_s=1e6), base=base
    )
    assert not result.measured_prefill
    assert [(s.new_tokens, s.cached_tokens) for s in result.prefill] == list(PLAN.prefill_points)
    for sample in result.prefill:
        expected = sample.new_tokens * PER_TOKEN_S + sample.cached_tokens * PER_CACHED_S
        assert sample.seconds == pytest.approx(expected)


def test_no_call_may_run_past_the_budget_plus_one_step() -> None:
    """Each call's deadline is at most max_step_s past the profile's budget (not the 30 s
    call timeout): an engine that stalls mid-profile holds the profile that long at most."""
    config = settings(budget_s=5.0, max_step_s=1.0)
    engine, _ = run_profile(WorkerRole.DECODE, config, base=exact_base())
    start = FakeClock().now
    assert engine.deadlines[0] == start + config.budget_s + config.max_step_s  # 6 s < 30 s
    assert max(engine.deadlines) <= start + config.budget_s + config.max_step_s
    # The engine stops making progress after 5 calls: the 6th runs into its deadline.
    engines: list[SimulatedEngine] = []
    with pytest.raises(WorkerError):
        run_profile(WorkerRole.DECODE, config, stall_after=5, engines=engines, base=exact_base())
    (stalled,) = engines
    assert len(stalled.calls) == 6
    assert stalled.clock.now == stalled.deadlines[-1]
    assert stalled.clock.now <= start + config.budget_s + config.max_step_s


def test_no_point_in_reach_is_an_error() -> None:
    with pytest.raises(ValueError, match="no profile point ran"):
        run_profile(WorkerRole.PREFILL, settings(budget_s=1e-3, max_step_s=1e6), base=exact_base())


@dataclass
class ServedEngine(SimulatedEngine):
    """The simulated engine with client requests arriving at ``arrivals`` (each ``client_s``
    long): a client is served as soon as the engine is free (after a profile call in progress);
    records the profile's calls and the clients' service as (start, end) intervals."""

    arrivals: list[float] = field(default_factory=list)
    client_s: float = 0.3
    profile_calls: list[tuple[float, float]] = field(default_factory=list)
    clients: list[tuple[float, float, float]] = field(default_factory=list)
    """(arrival, start, end) of each client request served."""

    def serve_arrived(self) -> None:
        while self.arrivals and self.arrivals[0] <= self.clock.now:
            arrival = self.arrivals.pop(0)
            start = self.clock.now
            self.clock.now += self.client_s
            self.clients.append((arrival, start, self.clock.now))

    async def prefill(self, **kwargs: Any) -> PrefillResult:
        start = self.clock.now
        result = await super().prefill(**kwargs)
        self.profile_calls.append((start, self.clock.now))
        return result

    async def decode(self, **kwargs: Any) -> AsyncGenerator[DecodeOutput, None]:
        start = self.clock.now
        async for chunk in super().decode(**kwargs):
            yield chunk
        self.profile_calls.append((start, self.clock.now))


def union_s(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, -math.inf
    for begin, end in sorted(intervals):
        if end > reach:
            total += end - max(begin, reach)
            reach = end
    return total


def test_the_profile_never_runs_beside_a_client_and_takes_at_most_its_share() -> None:
    """Clients arrive every 0.7 s for 0.3 s each, the profile's calls take up to max_step_s: no
    call overlaps a client's service, a client waits at most the one call in progress, and the
    profile's engine time stays within max_share of its run (plus the last call)."""
    clock = FakeClock()
    start = clock.now
    engine = ServedEngine(clock, arrivals=[start + 0.05 + 0.7 * i for i in range(100)])
    config = settings(budget_s=20.0, max_step_s=2.0, max_share=0.5)

    async def yield_to(timeout_s: float) -> bool:
        engine.serve_arrived()  # the registry's gate: the instance's client requests first
        return True

    async def sleep(seconds: float) -> None:
        deadline = clock.now + seconds
        while engine.arrivals and engine.arrivals[0] <= deadline:  # clients use the pause
            clock.now = max(clock.now, engine.arrivals[0])
            engine.serve_arrived()
        clock.now = max(clock.now, deadline)
        await asyncio.sleep(0)

    client: Any = engine

    async def main() -> ProfileResult:
        return await profile_worker(
            client,
            WorkerRole.DECODE,
            PLAN,
            config,
            seed=1,
            base=exact_base(),
            clock=clock,
            sleep=sleep,
            yield_to=yield_to,
        )

    result = asyncio.run(main())
    calls, clients = engine.profile_calls, engine.clients
    assert len(calls) > 15 and len(clients) > 15 and result.measured_prefill
    for call_start, call_end in calls:
        for _, client_start, client_end in clients:
            assert client_end <= call_start or client_start >= call_end  # never side by side
    longest_call = max(end - begin for begin, end in calls)
    assert longest_call <= config.max_step_s
    assert max(begin - arrival for arrival, begin, _ in clients) <= longest_call + 1e-9
    busy = union_s(calls)  # a decode point's streams run side by side
    assert busy == pytest.approx(result.seconds - result.waited_s - result.paused_s, rel=1e-9)
    assert busy <= config.max_share * result.seconds + longest_call
    assert result.seconds <= config.budget_s + longest_call
