"""The chaos suite's load: an open-loop generator against the gateway's OpenAI API, what it
records per request, summaries of a run, and the knee (the rate past which goodput stops growing).

Stable API (other chaos tests import it; keep it small):

- :class:`Workload` -- the requests a run sends: ``workload.request(i)`` is request ``i``'s
  :class:`RequestSpec` (chat or completions, streaming or not, a seeded prompt of unique words so
  nothing is cached unless asked: ``shared_prefix``). Deterministic for a seed: a test can compute
  the greedy reference of request ``i`` (:func:`tests.e2e.conftest.run_reference`, with
  :meth:`RequestSpec.reference`).
- :func:`run_load` -- open-loop arrivals at ``rate`` requests/s for ``duration_s`` (Poisson or
  fixed intervals, seeded): each request is sent at its arrival time whether or not earlier ones
  finished, and awaited; returns one :class:`Result` per request, in arrival order.
- :class:`BackgroundLoad` -- the same in a thread (``with BackgroundLoad(...) as load:`` then
  inject a fault; ``load.results()`` after the block, ``load.in_flight()`` during it).
- :func:`summarize` -> :class:`Summary`: success rate, statuses, p50/p99 TTFT of the successes,
  goodput, throughput per time window; :meth:`Summary.figures` for ``chaos_report``.
- :func:`measure_knee` -> :class:`Knee`: a rate sweep (short steps, each step's arrivals all
  answered before the next) up to where goodput stops growing or TTFT explodes.
  ``chaos_knee`` (tests/chaos/conftest.py) caches it per session and cluster kind.

A :class:`Result`: status (0: no HTTP answer), the error body or event, TTFT (streams: to the
first chunk carrying text or tokens), start and end on the run's clock, prompt and completion
tokens, ``cached_tokens`` (usage), text, token ids (``return_token_ids``), Retry-After, the
finish reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.harness import percentile

__all__ = [
    "BackgroundLoad",
    "Knee",
    "RequestSpec",
    "Result",
    "Summary",
    "Workload",
    "measure_knee",
    "run_load",
    "send",
    "summarize",
]

_WORDS = (
    "river tower cache block memory decode engine prefill store lease arena token stream "
    "gateway worker router index tier offload window budget queue batch layer head value key "
    "north south east west amber cobalt silver granite maple cedar harbor meadow canyon"
).split()


@dataclass(frozen=True)
class RequestSpec:
    """One request: ``kind`` "completion" or "chat", the prompt text, its length and headers."""

    kind: str
    prompt: str
    max_tokens: int
    stream: bool
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"

    def body(self, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
            "stream": self.stream,
        }
        if self.kind == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def reference(self) -> dict[str, Any]:
        """The request for :func:`tests.e2e.conftest.run_reference` (greedy, one plain engine)."""
        if self.kind == "chat":
            return {
                "kind": "chat",
                "messages": [{"role": "user", "content": self.prompt}],
                "max_tokens": self.max_tokens,
                "ignore_eos": True,
            }
        return {
            "kind": "completion",
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
        }


@dataclass(frozen=True)
class Workload:
    """Seeded requests: ``prompt_words`` words each (about 1.3 tiny-model tokens a word),
    ``max_tokens`` generated, a ``stream_fraction`` of streams and a ``chat_fraction`` of chat
    requests; ``shared_prefix`` words common to all prompts (0: every prompt unique);
    ``headers`` on every request (e.g. ``x-strata-ttft-slo-ms``)."""

    seed: int = 0
    prompt_words: int = 60
    max_tokens: int = 16
    stream_fraction: float = 0.75
    chat_fraction: float = 0.25
    shared_prefix: int = 0
    headers: tuple[tuple[str, str], ...] = ()

    def request(self, i: int) -> RequestSpec:
        rng = random.Random(f"{self.seed}:{i}")
        prefix_rng = random.Random(f"{self.seed}:prefix")
        words = [prefix_rng.choice(_WORDS) for _ in range(self.shared_prefix)]
        words += [f"{rng.choice(_WORDS)}{rng.randrange(1000)}" for _ in range(self.prompt_words)]
        return RequestSpec(
            kind="chat" if rng.random() < self.chat_fraction else "completion",
            prompt=f"request {i}: " + " ".join(words),
            max_tokens=self.max_tokens,
            stream=rng.random() < self.stream_fraction,
            headers=self.headers,
        )


@dataclass
class Result:
    """What one request got. Times are seconds on the run's clock (0 = the run's start)."""

    index: int
    spec: RequestSpec
    start: float = math.nan
    end: float = math.nan
    status: int = 0
    error: str = ""
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        """Answered 200, no error event, finished with all its tokens."""
        return self.status == 200 and not self.error and self.finish_reason is not None

    @property
    def latency_s(self) -> float:
        return self.end - self.start


async def send(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    spec: RequestSpec,
    index: int = 0,
    clock0: float | None = None,
    timeout_s: float = 300.0,
) -> Result:
    """Send one request and record what came back; never raises for an HTTP or network error."""
    clock0 = time.monotonic() if clock0 is None else clock0
    result = Result(index=index, spec=spec)
    result.start = time.monotonic() - clock0
    try:
        async with session.post(
            base_url + spec.path,
            json=spec.body(model),
            headers=dict(spec.headers),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            result.status = resp.status
            result.retry_after = resp.headers.get("Retry-After")
            if resp.status != 200:
                result.error = (await resp.read()).decode("utf-8", "replace")
            elif spec.stream:
                await _read_stream(resp, result, clock0)
            else:
                _read_body(await resp.json(), result)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        result.error = result.error or f"{type(exc).__name__}: {exc}"
    result.end = time.monotonic() - clock0
    return result


def _take_choice(choice: dict[str, Any], result: Result) -> None:
    text = choice.get("text")
    if text is None:
        holder = choice.get("delta") or choice.get("message") or {}
        text = holder.get("content") or ""
    result.text += text
    result.token_ids.extend(choice.get("token_ids") or [])
    if choice.get("finish_reason"):
        result.finish_reason = choice["finish_reason"]


def _take_usage(usage: dict[str, Any] | None, result: Result) -> None:
    if usage:
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        result.completion_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = int(details.get("cached_tokens") or 0)


def _read_body(body: dict[str, Any], result: Result) -> None:
    for choice in body.get("choices") or []:
        _take_choice(choice, result)
    _take_usage(body.get("usage"), result)


async def _read_stream(resp: aiohttp.ClientResponse, result: Result, clock0: float) -> None:
    done = False
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            result.error = json.dumps(event)
            continue
        before = (len(result.text), len(result.token_ids))
        for choice in event.get("choices") or []:
            _take_choice(choice, result)
        if result.ttft_s is None and (len(result.text), len(result.token_ids)) != before:
            result.ttft_s = time.monotonic() - clock0 - result.start
        _take_usage(event.get("usage"), result)
    if not done and not result.error:
        result.error = "stream ended without [DONE]"


def arrivals(rate: float, duration_s: float, seed: int = 0, poisson: bool = True) -> list[float]:
    """Arrival times in [0, duration_s) at ``rate`` per second: Poisson (seeded) or fixed."""
    if rate <= 0:
        return []
    if not poisson:
        return [i / rate for i in range(int(duration_s * rate))]
    rng = random.Random(seed)
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate)
    return times


async def run_load_async(
    base_url: str,
    model: str,
    workload: Workload,
    rate: float,
    duration_s: float,
    *,
    first_index: int = 0,
    poisson: bool = True,
    timeout_s: float = 300.0,
    stop: threading.Event | None = None,
    in_flight: set[int] | None = None,
    clock0: float | None = None,
) -> list[Result]:
    """Open loop: request ``first_index + k`` is sent at arrival time ``k`` (see :func:`arrivals`,
    seeded by the workload's seed) and awaited; ``stop`` ends the arrivals early. ``in_flight``
    (if given) holds the indexes sent and not yet answered."""
    clock0 = time.monotonic() if clock0 is None else clock0
    times = arrivals(rate, duration_s, seed=workload.seed + first_index, poisson=poisson)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(k: int, at: float) -> Result:
            delay = at - (time.monotonic() - clock0)
            if delay > 0:
                await asyncio.sleep(delay)
            index = first_index + k
            if in_flight is not None:
                in_flight.add(index)
            try:
                return await send(
                    session, base_url, model, workload.request(index), index, clock0, timeout_s
                )
            finally:
                if in_flight is not None:
                    in_flight.discard(index)

        tasks: list[asyncio.Task[Result]] = []
        start = time.monotonic() - clock0
        for k, at in enumerate(times):
            while time.monotonic() - clock0 < start + at - 0.05:
                if stop is not None and stop.is_set():
                    break
                await asyncio.sleep(min(0.05, start + at - (time.monotonic() - clock0)))
            if stop is not None and stop.is_set():
                break
            tasks.append(asyncio.create_task(one(k, start + at)))
        return list(await asyncio.gather(*tasks))


def run_load(
    base_url: str, model: str, workload: Workload, rate: float, duration_s: float, **kw: Any
) -> list[Result]:
    """:func:`run_load_async` from synchronous code (its own event loop)."""
    return asyncio.run(run_load_async(base_url, model, workload, rate, duration_s, **kw))


class BackgroundLoad:
    """Open-loop load in a thread, for injecting a fault while it runs::

        with BackgroundLoad(url, model, workload, rate, duration_s) as load:
            time.sleep(5); kill_something()
        results = load.results()

    Leaving the block stops the arrivals only if ``stop_on_exit`` (default: the run goes on to
    ``duration_s``) and waits for every request sent to be answered."""

    def __init__(
        self,
        base_url: str,
        model: str,
        workload: Workload,
        rate: float,
        duration_s: float,
        *,
        stop_on_exit: bool = False,
        **kw: Any,
    ) -> None:
        self.clock0 = time.monotonic()
        self._stop = threading.Event()
        self._stop_on_exit = stop_on_exit
        self._in_flight: set[int] = set()
        self._results: list[Result] | None = None
        self._error: BaseException | None = None

        def target() -> None:
            try:
                self._results = run_load(
                    base_url,
                    model,
                    workload,
                    rate,
                    duration_s,
                    stop=self._stop,
                    in_flight=self._in_flight,
                    clock0=self.clock0,
                    **kw,
                )
            except BaseException as exc:  # handed to the test by results()
                self._error = exc

        self._thread = threading.Thread(target=target, name="chaos-load", daemon=True)

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop_on_exit or exc[0] is not None:
            self._stop.set()
        self._thread.join()

    def now(self) -> float:
        """Seconds on the run's clock (the Results' start/end)."""
        return time.monotonic() - self.clock0

    def in_flight(self) -> set[int]:
        """Indexes of the requests sent and not answered yet (from any thread)."""
        while True:
            try:
                return set(self._in_flight)
            except RuntimeError:  # changed size while copied: the load's loop moved on
                continue

    def stop(self) -> None:
        """End the arrivals now (requests already sent are still awaited)."""
        self._stop.set()

    def results(self) -> list[Result]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._results is not None
        return self._results


@dataclass(frozen=True)
class Summary:
    requests: int
    ok: int
    statuses: dict[int, int]
    """HTTP status -> count (0: no answer); a 200 with an error event counts as 200 here."""
    errors: int
    """Requests not ok and not refused with 429."""
    success_rate: float
    goodput_rps: float
    """Successes per second over the span from the first start to the last end."""
    ttft_p50_s: float
    ttft_p99_s: float
    latency_p50_s: float
    latency_p99_s: float
    windows: list[tuple[float, float]]
    """(window start, successes per second ending in it)."""

    def figures(self, prefix: str = "") -> dict[str, Any]:
        """The headline figures for ``chaos_report``, names prefixed."""
        return {
            f"{prefix}requests": self.requests,
            f"{prefix}success_rate": round(self.success_rate, 5),
            f"{prefix}statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            f"{prefix}goodput_rps": round(self.goodput_rps, 3),
            f"{prefix}ttft_p50_ms": _ms(self.ttft_p50_s),
            f"{prefix}ttft_p99_ms": _ms(self.ttft_p99_s),
            f"{prefix}latency_p99_ms": _ms(self.latency_p99_s),
        }


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 1)


def summarize(results: Sequence[Result], window_s: float = 5.0) -> Summary:
    ok = [r for r in results if r.ok]
    statuses: dict[int, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    latencies = [r.latency_s for r in ok]
    span = (max(r.end for r in results) - min(r.start for r in results)) if results else 0.0
    windows: list[tuple[float, float]] = []
    if results:
        t0 = min(r.start for r in results)
        n = max(1, math.ceil(span / window_s))
        counts = [0] * n
        for r in ok:
            counts[min(n - 1, int((r.end - t0) / window_s))] += 1
        windows = [(round(t0 + i * window_s, 3), c / window_s) for i, c in enumerate(counts)]
    return Summary(
        requests=len(results),
        ok=len(ok),
        statuses=statuses,
        errors=sum(1 for r in results if not r.ok and r.status != 429),
        success_rate=len(ok) / len(results) if results else math.nan,
        goodput_rps=len(ok) / span if span > 0 else 0.0,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        latency_p50_s=percentile(latencies, 50),
        latency_p99_s=percentile(latencies, 99),
        windows=windows,
    )


@dataclass(frozen=True)
class Knee:
    """The rate (requests/s) past which goodput stopped growing, and the TTFTs there."""

    rate: float
    ttft_p50_s: float
    ttft_p99_s: float
    idle_ttft_s: float
    steps: list[dict[str, float]]
    """Each step of the sweep: rate, goodput, p50/p99 TTFT (s)."""

    def figures(self) -> dict[str, Any]:
        return {
            "knee_rps": round(self.rate, 3),
            "knee_ttft_p50_ms": _ms(self.ttft_p50_s),
            "knee_ttft_p99_ms": _ms(self.ttft_p99_s),
            "idle_ttft_ms": _ms(self.idle_ttft_s),
        }


def measure_knee(
    base_url: str,
    model: str,
    workload: Workload,
    *,
    step_s: float = 8.0,
    growth: float = 1.5,
    max_steps: int = 8,
    ttft_blowup: float = 3.0,
) -> Knee:
    """Sweep the arrival rate up until goodput stops growing or TTFT explodes.

    The sweep starts at half the rate one request at a time sustains (the median latency of
    sequential requests after two warm-up ones) and multiplies it by ``growth`` each step of
    ``step_s`` seconds (fixed intervals: each step sends exactly ``rate * step_s`` requests),
    every step's requests answered before the next starts. A step *holds* if at least 90 % of
    its requests succeed, its throughput (successes over the time from the first send to the
    last answer) is at least 80 % of its arrival rate (past saturation the queue, and so the
    span, grows) and its p50 TTFT is within ``ttft_blowup`` × the idle TTFT; the knee is the
    last step that held (its TTFTs are the knee's). Uses workload indexes from
    1,000,000 up, so the requests a test sends later are not cached by the sweep.
    """
    streaming = dataclasses.replace(workload, stream_fraction=1.0)
    warm = [asyncio.run(_one(base_url, model, streaming.request(1_000_000 + i))) for i in range(5)]
    if not all(r.ok for r in warm):
        raise RuntimeError(f"idle requests failed: {[r.error for r in warm]}")
    idle_ttft = percentile([r.ttft_s or 0.0 for r in warm[2:]], 50)
    idle_latency = percentile([r.latency_s for r in warm[2:]], 50)
    rate = 0.5 / idle_latency
    steps: list[dict[str, float]] = []
    held: dict[str, float] | None = None
    for step in range(max_steps):
        results = run_load(
            base_url,
            model,
            streaming,
            rate,
            step_s,
            first_index=1_000_100 + 10_000 * step,
            poisson=False,
            timeout_s=120.0,
        )
        summary = summarize(results)
        sent = max(1, len(results))
        row = {
            "rate": round(rate, 3),
            "sent": float(sent),
            "goodput": round(summary.ok / step_s, 3),
            "ttft_p50_s": summary.ttft_p50_s,
            "ttft_p99_s": summary.ttft_p99_s,
        }
        steps.append(row)
        row["throughput"] = round(summary.goodput_rps, 3)
        holds = (
            summary.ok >= 0.9 * sent
            and summary.goodput_rps >= 0.8 * rate
            and summary.ttft_p50_s <= ttft_blowup * idle_ttft
        )
        if not holds:
            break
        held = row
        rate *= growth
    if held is None:
        held = steps[0]
    return Knee(
        rate=held["rate"],
        ttft_p50_s=held["ttft_p50_s"],
        ttft_p99_s=held["ttft_p99_s"],
        idle_ttft_s=idle_ttft,
        steps=steps,
    )


async def _one(base_url: str, model: str, spec: RequestSpec) -> Result:
    async with aiohttp.ClientSession() as session:
        return await send(session, base_url, model, spec)
