"""The counters a worker reports in its Health reply.

``KV_COUNTERS`` names the KV connector's counters: the connector counts them in the engine-core
process (``StrataConnectorStats``) and vLLM's stats pipeline carries them to the worker process,
which sums them here.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["KV_COUNTERS", "WorkerCounters"]

KV_COUNTERS = (
    "blocks_saved",
    "blocks_loaded",
    "bytes_saved",
    "bytes_loaded",
    "save_time_s",
    "load_time_s",
    "load_failures",
    "save_failures",
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

    def add_kv(self, data: dict[str, Any]) -> None:
        with self._lock:
            for name in KV_COUNTERS:
                self.kv[name] += data.get(name, 0)

    def finish_request(self, num_prompt: int, num_cached: int, num_external: int) -> None:
        with self._lock:
            self.kv_tokens_loaded += num_external
            self.prompt_tokens_computed += max(0, num_prompt - num_cached)
