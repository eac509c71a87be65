"""Mooncake-format traces: requests with arrival times, lengths and prefix-block ids.

Each line of the file is ``{"timestamp": ms, "input_length": n, "output_length": m,
"hash_ids": [...]}``; ``hash_ids`` name the prompt's 512-token blocks, two requests sharing
their first k ids share k·512 prompt tokens (../shared/traces/README.md). The simulator keys
its prefix caches by these ids (docs/design/simulator.md §4): :func:`block_key` is the 16-byte
key of an id, the same for every request that has it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvstore.blocks.hashing import BLOCK_KEY_BYTES, BlockKey

__all__ = [
    "TRACE_BLOCK_TOKENS",
    "ReplayScale",
    "Trace",
    "TraceRequest",
    "block_key",
    "check_rate_profile",
    "load_trace",
]

TRACE_BLOCK_TOKENS = 512
"""Tokens per hash id in Mooncake's traces."""


def block_key(hash_id: int) -> BlockKey:
    """The key of the trace block ``hash_id`` (a digest, so keys spread over the index's table
    like real block keys)."""
    return hashlib.blake2b(hash_id.to_bytes(8, "little"), digest_size=BLOCK_KEY_BYTES).digest()


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace; ``arrival_s`` from the trace's start at its own rate."""

    index: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    keys: tuple[BlockKey, ...]
    """Keys of the prompt's *whole* blocks, in order (a partial last block has none)."""
    hash_ids: tuple[int, ...] = ()
    """The trace's ids of the prompt's blocks, as recorded (a replay turns each into tokens)."""


@dataclass(frozen=True, slots=True)
class ReplayScale:
    """How a replay shrinks a trace's requests to what a small engine serves
    (loadtests/replay_trace.py; a simulation of that replay scales them the same way): each
    512-token trace block becomes ``block_tokens`` tokens, the prompt's length is scaled alike,
    the output is capped at ``max_output_tokens``."""

    block_tokens: int = 16
    max_output_tokens: int = 64

    def __post_init__(self) -> None:
        if self.block_tokens < 1 or self.max_output_tokens < 1:
            raise ValueError("block_tokens and max_output_tokens must be >= 1")

    def input_tokens(self, trace_tokens: int) -> int:
        return max(1, math.ceil(trace_tokens * self.block_tokens / TRACE_BLOCK_TOKENS))

    def output_tokens(self, trace_tokens: int) -> int:
        return max(1, min(trace_tokens, self.max_output_tokens))

    def whole_blocks(self, request: TraceRequest) -> int:
        """How many of the request's trace blocks its scaled prompt holds whole (its first
        tokens; the rest of the prompt is the request's own)."""
        return min(
            len(request.hash_ids), self.input_tokens(request.input_tokens) // self.block_tokens
        )

    def scale(self, request: TraceRequest) -> TraceRequest:
        """The request as the replay sends it: scaled lengths, keys of its whole blocks."""
        keys = tuple(block_key(h) for h in request.hash_ids[: self.whole_blocks(request)])
        return dataclasses.replace(
            request,
            input_tokens=self.input_tokens(request.input_tokens),
            output_tokens=self.output_tokens(request.output_tokens),
            keys=keys,
        )


@dataclass(frozen=True, slots=True)
class Trace:
    requests: tuple[TraceRequest, ...]
    source: str

    def scaled(self, scale: ReplayScale) -> Trace:
        """The trace as a replay at ``scale`` sends it (arrival times unchanged)."""
        return Trace(tuple(scale.scale(r) for r in self.requests), self.source)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    @property
    def native_rate(self) -> float:
        """Requests per second as recorded (over the span of arrivals)."""
        span = self.duration_s
        return (len(self.requests) - 1) / span if span > 0 else float("inf")

    def at_rate(
        self, rate: float, profile: Sequence[tuple[float, float]] = ()
    ) -> tuple[TraceRequest, ...]:
        """The requests with their arrival times scaled so that the trace runs at ``rate``
        requests per second (its burstiness kept). With a ``profile`` of ``(seconds,
        multiplier)`` points (piecewise linear from second 0 to the last point, where the run
        ends: later requests are left out) the rate at time ``t`` is ``rate·multiplier(t)``: the
        trace's arrivals are warped so that by ``t`` as many requests have come as that rate
        brings (a day's swing compressed into minutes, each burst still there)."""
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        native = self.native_rate
        if native == float("inf"):
            return self.requests
        start = self.requests[0].arrival_s
        if not profile:
            scale = native / rate
            return tuple(
                dataclasses.replace(r, arrival_s=(r.arrival_s - start) * scale)
                for r in self.requests
            )
        check_rate_profile(profile)
        # Expected arrivals by each request's native time, then the time by which the profile
        # brings as many: the inverse of its cumulative rate, exact on each linear segment.
        counts = np.array([(r.arrival_s - start) * native for r in self.requests])
        times = np.array([t for t, _ in profile], dtype=float)
        rates = rate * np.array([m for _, m in profile], dtype=float)
        lengths = np.diff(times)
        cumulative = np.concatenate(([0.0], np.cumsum((rates[1:] + rates[:-1]) / 2 * lengths)))
        total = float(cumulative[-1])
        if counts[-1] < total - 1.0:
            raise ValueError(
                f"the trace has {len(counts)} requests; its rate profile at {rate:g} requests/s "
                f"needs {total:.0f}: lower the rate or shorten the profile"
            )
        keep = counts <= total + 1e-9
        counts = counts[keep]
        segment = np.clip(
            np.searchsorted(cumulative, counts, side="right") - 1, 0, len(lengths) - 1
        )
        r0, r1 = rates[segment], rates[segment + 1]
        length = lengths[segment]
        need = counts - cumulative[segment]
        # Within a segment the rate goes r0 -> r1: arrivals by x are r0·x + (r1-r0)/(2L)·x².
        a = (r1 - r0) / (2 * length)
        flat = np.abs(a) < 1e-12
        safe_a = np.where(flat, 1.0, a)
        root = (-r0 + np.sqrt(np.maximum(0.0, r0 * r0 + 4 * safe_a * need))) / (2 * safe_a)
        offset = np.where(flat, need / r0, root)
        warped = times[segment] + np.clip(offset, 0.0, length)
        kept = [r for r, k in zip(self.requests, keep, strict=True) if k]
        return tuple(
            dataclasses.replace(r, arrival_s=float(t)) for r, t in zip(kept, warped, strict=True)
        )


def check_rate_profile(profile: Sequence[tuple[float, float]]) -> None:
    """ValueError unless there are two points or more, from second 0 forward, and every
    multiplier is > 0."""
    if len(profile) < 2 or profile[0][0] != 0:
        raise ValueError("rate_profile needs two points or more, the first at second 0")
    seconds = [t for t, _ in profile]
    if seconds != sorted(set(seconds)):
        raise ValueError("rate_profile seconds must increase")
    if any(not (math.isfinite(m) and m > 0) for _, m in profile):
        raise ValueError("rate_profile multipliers must be > 0")


def _request(index: int, line: str, block_tokens: int) -> TraceRequest:
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("a record is a JSON object")
    timestamp = record["timestamp"]
    input_tokens = record["input_length"]
    output_tokens = record["output_length"]
    hash_ids = record.get("hash_ids", [])
    if not all(
        isinstance(v, int) and not isinstance(v, bool) for v in (input_tokens, output_tokens)
    ):
        raise ValueError("input_length and output_length must be integers")
    if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool) or timestamp < 0:
        raise ValueError("timestamp must be a number >= 0 (ms)")
    if input_tokens < 1 or output_tokens < 1:
        raise ValueError("input_length and output_length must be >= 1")
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hash_ids
    ):
        raise ValueError("hash_ids must be a list of integers >= 0")
    whole = min(len(hash_ids), input_tokens // block_tokens)
    keys = tuple(block_key(h) for h in hash_ids[:whole])
    return TraceRequest(
        index, timestamp / 1000.0, input_tokens, output_tokens, keys, tuple(hash_ids)
    )


def load_trace(path: Path, *, limit: int = 0, block_tokens: int = TRACE_BLOCK_TOKENS) -> Trace:
    """Read a Mooncake-format trace (the first ``limit`` requests; 0 = all), ordered by arrival.
    ValueError naming the line on a bad record."""
    requests: list[TraceRequest] = []
    try:
        with path.open() as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    requests.append(_request(len(requests), line, block_tokens))
                except (ValueError, KeyError, TypeError) as exc:
                    what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
                    raise ValueError(f"{path}:{number}: {what}") from None
                if limit and len(requests) >= limit:
                    break
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the trace: {exc}") from None
    if not requests:
        raise ValueError(f"{path}: no requests")
    ordered: Sequence[TraceRequest] = sorted(requests, key=lambda r: (r.arrival_s, r.index))
    return Trace(tuple(ordered), str(path))
