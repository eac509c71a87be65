"""The counters a worker reports in its Health and Stats replies.

``KV_COUNTERS`` names the KV connector's counters: the connector counts them in the engine-core
process (``StrataConnectorStats``) and vLLM's stats pipeline carries them to the worker process,
which sums them here. ``EngineProgress`` is the engine's progress as Health reports it: the work
it has and how long it has had work without completing a step (the gateway's stall rule,
docs/design/gateway.md "Health and failover").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["KV_COUNTERS", "EngineProgress", "WorkerCounters"]

KV_COUNTERS = (
    "blocks_saved",
    "blocks_loaded",
    "bytes_saved",
    "bytes_loaded",
    "save_time_s",
    "load_time_s",
    "load_failures",
    "save_failures",
    # Not KV, but counted beside it in the model runner: its heap trims (strata_common/heap.py).
    "heap_trims",
    "heap_trimmed_bytes",
    "heap_trim_time_s",
)


class WorkerCounters:
    """The worker's own counters; the KV ones arrive through vLLM's stats pipeline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.num_requests = 0
        self.num_running = 0
        self.kv_tokens_loaded = 0
        self.prompt_tokens_computed = 0
        self.kv: dict[str, float] = dict.fromkeys(KV_COUNTERS, 0)
        self.kv_cache_blocks = 0
        """The engine's KV cache size in blocks (0 until the engine has said)."""
        self.kv_blocks_in_use = 0
        """Blocks held by the engine's requests at its last step (cached-only blocks are free)."""

    def add_kv(self, data: dict[str, Any]) -> None:
        with self._lock:
            for name in KV_COUNTERS:
                self.kv[name] += data.get(name, 0)

    def engine_step(self, kv_cache_usage: float) -> None:
        """The engine's KV cache usage (0..1, vLLM's scheduler stats) after one of its steps."""
        usage = min(1.0, max(0.0, kv_cache_usage))
        self.kv_blocks_in_use = round(usage * self.kv_cache_blocks)

    def finish_request(self, num_prompt: int, num_cached: int, num_external: int) -> None:
        with self._lock:
            self.kv_tokens_loaded += num_external
            self.prompt_tokens_computed += max(0, num_prompt - num_cached)


class EngineProgress:
    """Whether the engine moves: the work items it has now and when it last made progress.

    A work item is a request the worker handed to the engine, or an abort the engine core has not
    confirmed yet (a request cancelled while the engine core was stopped is still the engine's
    work until the core has processed its abort: the worker does not look idle, and healthy,
    while its engine is frozen). ``step()`` is called for every engine step (vLLM's stat logger
    is called once per engine-core step while it has requests).

    ``stalled_s()``: how long the engine has had work without completing a step; 0 when idle.
    The clock starts when work arrives at an idle engine (not at the last step before it went
    idle) and restarts at each step. All on this process's monotonic clock.
    Called from the worker's event loop only (the stat logger runs in it too).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.num_items = 0
        self._since_s = 0.0
        """When the engine last made progress: its last step, or the arrival of work at an
        idle engine."""
        self.num_steps = 0

    def begin(self) -> None:
        """One more work item (a request enters the engine, or an abort is sent to it)."""
        if self.num_items == 0:
            self._since_s = self._clock()
        self.num_items += 1

    def end(self) -> None:
        """A work item is done (the request finished, or the core confirmed its abort)."""
        if self.num_items <= 0:
            raise RuntimeError("EngineProgress.end() without begin()")
        self.num_items -= 1

    def step(self) -> None:
        """The engine completed a step."""
        self.num_steps += 1
        self._since_s = self._clock()

    def stalled_s(self) -> float:
        """Seconds with work and no step; 0 when the engine has no work."""
        if self.num_items == 0:
            return 0.0
        return max(0.0, self._clock() - self._since_s)
