"""The start-up profile of one worker: real Prefill/Decode calls that calibrate its latency model.

When an instance turns ready the registry runs :func:`profile_worker` in the background (the
instance is scheduled with the priors until it lands; docs/design/scheduling.md §2.3, §7). The
points come from :meth:`ProfilePlan.for_engine`, bounded by :class:`ProfileSettings` so that a
long context or a big batch does not make the profile itself a load test.

* **Prefill** points ``(new n, cached c)``: a fresh random prompt of ``c + n`` tokens; when
  ``c > 0`` its first ``c`` tokens are run first, so the engine's prefix cache (or the KV pool)
  holds them. The sample uses what the engine reports: ``num_cached_tokens`` (the cached count
  actually hit) and ``engine_time_s`` (no gateway or RPC time). A decode-role worker has no
  Prefill rpc: it is timed as a Decode of one token (what a local route costs it), wall time at
  the gateway.
* **Decode** points ``(batch b, context k)``: ``b`` concurrent Decode streams of ``k / b``
  prompt tokens each, ``decode_tokens`` greedy tokens (EOS ignored); the sample is the mean gap
  between chunks after each stream's first one, at the mean context over those steps.
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
import itertools
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from controlplane.scheduling.predictor import (
    HANDOFF_DECODE_TOKENS,
    PRIOR_DECODE,
    DecodeSample,
    PrefillSample,
    ProfilePlan,
)
from controlplane.workers import PrefillResult, WorkerClient, WorkerRole, WorkerSampling

__all__ = ["ProfileResult", "ProfileSettings", "profile_worker"]

_FIRST_TOKEN_ID: Final = 10
"""Synthetic prompts avoid the lowest ids (special tokens in most vocabularies)."""


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    """Bounds of the start-up profile (GatewayConfig.profile_*)."""

    enabled: bool = True
    max_model_len: int = 1024
    max_batch: int = 8
    repeats: int = 1
    decode_tokens: int = 8
    vocab_size: int = 0
    """Token ids are drawn below this (0 = the profile cannot run: no vocabulary known)."""
    timeout_s: float = 120.0
    """Deadline of each call of the profile."""


@dataclass(frozen=True, slots=True)
class ProfileResult:
    prefill: tuple[PrefillSample, ...]
    decode: tuple[DecodeSample, ...]
    seconds: float
    ttft_overhead_s: float | None = None
    """Median rpc wall time minus engine time of the Prefill calls (prefill role)."""
    handoff_s: float | None = None
    """Median hand-off cost beyond the steps (decode role, when the plan has hand-off points)."""


def plan_for(
    settings: ProfileSettings, max_model_len: int, block_size: int, capacity: int
) -> ProfilePlan:
    """The engine's plan, within the settings' bounds (context, batch, repeats)."""
    context = min(max_model_len, settings.max_model_len)
    plan = ProfilePlan.for_engine(context, block_size, max(1, min(capacity, settings.max_batch)))
    return replace(plan, repeats=settings.repeats)


async def profile_worker(
    client: WorkerClient,
    role: WorkerRole,
    plan: ProfilePlan,
    settings: ProfileSettings,
    *,
    seed: int,
) -> ProfileResult:
    """Time ``plan`` on the worker behind ``client``; raises WorkerError if a call fails."""
    started = time.monotonic()
    profiler = _Profiler(client, settings, seed)
    prefill: list[PrefillSample] = []
    decode: list[DecodeSample] = []
    handoffs: list[float] = []
    for _ in range(plan.repeats):
        for new, cached in plan.prefill_points:
            if role is WorkerRole.PREFILL:
                prefill.append(await profiler.prefill(new, cached))
            else:
                prefill.append(await profiler.local_prefill(new, cached))
        if role is WorkerRole.PREFILL:
            continue
        for batch, context in plan.decode_points:
            sample = await profiler.decode(batch, context, plan_context(plan))
            if sample is not None:
                decode.append(sample)
        for new, cached in plan.handoff_points:
            extra_s = await profiler.handoff(new, cached)
            if extra_s is not None:
                handoffs.append(extra_s)
    if role is WorkerRole.PREFILL or len(decode) < 3:
        decode = [DecodeSample(b, k, PRIOR_DECODE.predict_s(b, k)) for b, k in plan.decode_points]
    overheads = profiler.rpc_overheads_s
    return ProfileResult(
        tuple(prefill),
        tuple(decode),
        time.monotonic() - started,
        ttft_overhead_s=statistics.median(overheads) if overheads else None,
        handoff_s=statistics.median(handoffs) if handoffs else None,
    )


def plan_context(plan: ProfilePlan) -> int:
    """The context the plan was made for (its longest prefill prompt + 1)."""
    return max(n + c for n, c in plan.prefill_points) + 1


class _Profiler:
    __slots__ = ("_client", "_count", "_random", "_settings", "rpc_overheads_s")

    def __init__(self, client: WorkerClient, settings: ProfileSettings, seed: int) -> None:
        if settings.vocab_size <= _FIRST_TOKEN_ID + 1:
            raise ValueError("the profile needs the vocabulary size")
        self._client = client
        self._settings = settings
        self._random = random.Random(seed)
        self._count = 0
        self.rpc_overheads_s: list[float] = []
        """Wall time minus engine time of each timed Prefill call."""

    def _prompt(self, num_tokens: int) -> list[int]:
        randrange = self._random.randrange
        high = self._settings.vocab_size
        return [randrange(_FIRST_TOKEN_ID, high) for _ in range(num_tokens)]

    def _request_id(self) -> str:
        self._count += 1
        return f"strata-profile-{self._random.getrandbits(48):012x}-{self._count}"

    def _sampling(self, max_tokens: int) -> WorkerSampling:
        return WorkerSampling(
            max_tokens=max_tokens,
            temperature=0.0,
            top_p=1.0,
            seed=None,
            stop=(),
            stop_token_ids=(),
            ignore_eos=True,
        )

    async def prefill(self, new: int, cached: int) -> PrefillSample:
        prompt = self._prompt(new + cached)
        if cached:
            await self._run_prefill(prompt[:cached])
        start = time.monotonic()
        result = await self._run_prefill(prompt)
        wall_s = time.monotonic() - start
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
            timeout_s=self._settings.timeout_s,
        )

    async def local_prefill(self, new: int, cached: int) -> PrefillSample:
        prompt = self._prompt(new + cached)
        if cached:
            await self._run_decode(prompt[:cached], 1)
        start = time.monotonic()
        times, num_cached = await self._run_decode(prompt, 1)
        hit = min(num_cached, len(prompt) - 1)
        return PrefillSample(len(prompt) - hit, hit, max(1e-6, times[0] - start))

    async def handoff(self, new: int, cached: int) -> float | None:
        """A decode of ``cached + new`` tokens whose first ``cached`` are cached: first-chunk
        wait minus its tokens' share of the later steps (None if too few tokens came)."""
        prompt = self._prompt(new + cached)
        await self._run_decode(prompt[:cached], 1)
        counts: list[int] = []
        start = time.monotonic()
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
            timeout_s=self._settings.timeout_s,
        )
        async for chunk in stream:
            if chunk.token_ids:
                times.append(time.monotonic())
                if counts is not None:
                    counts.append(len(chunk.token_ids))
            num_cached = max(num_cached, chunk.num_cached_tokens)
        return times, num_cached

    async def decode(self, batch: int, context: int, max_model_len: int) -> DecodeSample | None:
        tokens = self._settings.decode_tokens
        per_sequence = max(1, min(context // batch, max_model_len - tokens - 1))
        prompts = [self._prompt(per_sequence) for _ in range(batch)]
        runs = await asyncio.gather(*(self._run_decode(p, tokens) for p in prompts))
        gaps = [b - a for times, _ in runs for a, b in itertools.pairwise(times[1:])]
        mean_gap_s = sum(gaps) / len(gaps) if gaps else 0.0
        if mean_gap_s <= 0.0:
            return None
        # Over the timed steps each sequence holds its prompt plus 1.5 .. n generated tokens.
        mean_generated = (1 + tokens) / 2.0 + 0.5
        context_tokens = round(batch * (per_sequence + mean_generated))
        return DecodeSample(batch, context_tokens, mean_gap_s)
