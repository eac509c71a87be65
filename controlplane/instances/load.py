"""Load tracking: the in-flight counters of each instance, moved along by the gateway's requests.

``track_prefill`` / ``track_decode`` count a request's work on an instance while it runs
(queued prefill tokens, running decodes, their context and remaining tokens: the policies'
:class:`~controlplane.scheduling.InstanceLoad`); a :class:`DecodeTracker` also times a hand-off's
first chunk for the latency model (docs/design/scheduling.md §2.2).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from controlplane.instances.instance import Instance
from controlplane.instances.state import InstanceStates
from controlplane.instances.types import (
    InstanceState,
)
from controlplane.workers.client import WorkerError, WorkerErrorKind
from controlplane.workers.roles import WorkerRole

__all__ = ["DecodeTracker", "LoadTracking"]

logger = logging.getLogger("controlplane.instances.registry")


class DecodeTracker:
    """Moves an instance's decode counters along as its decode streams tokens. A decode that
    prefills its own prompt (a local route) also counts as a queued prefill until its first
    tokens arrive.

    It also times the stream for the latency model: a decode that takes over a request
    prefilled elsewhere (no local prefill) waits ``w`` for its first chunk of ``j`` tokens,
    then steps ``s`` apart on average (over the later chunks); ``w - j·s`` is what the hand-off
    cost beyond the steps (:meth:`handoff_extra_s`, the decode predictor's ``handoff_s``)."""

    __slots__ = (
        "_clock",
        "_first_chunk_s",
        "_first_chunk_tokens",
        "_instance",
        "_last_chunk_s",
        "_num_later_tokens",
        "_start_s",
        "is_handoff",
        "num_context_tokens",
        "num_pending_prefill_tokens",
        "num_remaining_tokens",
        "prefill_pending",
    )

    def __init__(
        self,
        instance: Instance,
        num_context_tokens: int,
        num_remaining_tokens: int,
        num_prefill_tokens: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._instance = instance
        self.num_context_tokens = num_context_tokens
        self.num_remaining_tokens = num_remaining_tokens
        self.prefill_pending = num_prefill_tokens is not None
        self.is_handoff = not self.prefill_pending
        self.num_pending_prefill_tokens = num_prefill_tokens or 0
        if self.prefill_pending:
            instance.num_prefills += 1
            instance.num_prefill_starts += 1
            instance.num_queued_prefill_tokens += self.num_pending_prefill_tokens
        self._clock = clock
        self._start_s = clock()
        self._first_chunk_s: float | None = None
        self._first_chunk_tokens = 0
        self._last_chunk_s = 0.0
        self._num_later_tokens = 0

    def handoff_extra_s(self) -> float | None:
        """First-chunk wait minus its tokens' share of the later steps, for a hand-off that
        streamed at least two tokens after its first chunk; None otherwise."""
        first = self._first_chunk_s
        if not self.is_handoff or first is None or self._num_later_tokens < 2:
            return None
        step_s = (self._last_chunk_s - first) / self._num_later_tokens
        return (first - self._start_s) - self._first_chunk_tokens * step_s

    def end_prefill(self) -> None:
        """The local prefill is done (first tokens, or the decode ended)."""
        if self.prefill_pending:
            self.prefill_pending = False
            self._instance.num_prefills -= 1
            self._instance.num_queued_prefill_tokens -= self.num_pending_prefill_tokens

    def add_tokens(self, num_tokens: int) -> None:
        self.end_prefill()
        if num_tokens > 0:
            now = self._clock()
            if self._first_chunk_s is None:
                self._first_chunk_s = now
                self._first_chunk_tokens = num_tokens
            else:
                self._num_later_tokens += num_tokens
            self._last_chunk_s = now
        num_tokens = min(num_tokens, self.num_remaining_tokens)
        self.num_context_tokens += num_tokens
        self.num_remaining_tokens -= num_tokens
        self._instance.num_context_tokens += num_tokens
        self._instance.num_remaining_decode_tokens -= num_tokens


class LoadTracking(InstanceStates):
    """The in-flight counters of each instance (what the policies see as its load) and the
    request counters, moved along by the gateway's requests."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._num_requests = 0
        self._num_failovers = 0

    @contextmanager
    def track_prefill(self, instance: Instance, num_prompt_tokens: int) -> Iterator[None]:
        """Counts one prefill of ``num_prompt_tokens`` uncached tokens on ``instance`` while the
        block runs."""
        self._begin(instance)
        overlapped = instance.num_prefills > 0
        starts = instance.num_prefill_starts = instance.num_prefill_starts + 1
        instance.num_prefills += 1
        instance.num_queued_prefill_tokens += num_prompt_tokens
        try:
            yield
        finally:
            instance.num_queued_prefill_tokens -= num_prompt_tokens
            instance.num_prefills -= 1
            # Solo: nothing in flight when it started and nothing started since.
            instance.last_prefill_solo = not overlapped and instance.num_prefill_starts == starts
            self._end(instance)

    @contextmanager
    def track_decode(
        self,
        instance: Instance,
        num_context_tokens: int,
        num_max_tokens: int,
        *,
        num_prefill_tokens: int | None = None,
    ) -> Iterator[DecodeTracker]:
        """Counts one decode on ``instance`` while the block runs; the tracker moves the tokens
        it generates from the instance's remaining tokens to its context tokens.
        ``num_prefill_tokens``: the decode prefills its prompt itself (a local route); these
        uncached tokens count as queued prefill work until its first tokens."""
        self._begin(instance)
        instance.num_running_decodes += 1
        instance.num_context_tokens += num_context_tokens
        instance.num_remaining_decode_tokens += num_max_tokens
        tracker = DecodeTracker(
            instance, num_context_tokens, num_max_tokens, num_prefill_tokens, clock=self._clock
        )
        try:
            yield tracker
        finally:
            extra_s = tracker.handoff_extra_s()
            if extra_s is not None:
                instance.predictor.observe_handoff(extra_s)
            tracker.end_prefill()
            instance.num_context_tokens -= tracker.num_context_tokens
            instance.num_remaining_decode_tokens -= tracker.num_remaining_tokens
            instance.num_running_decodes -= 1
            self._end(instance)

    def note_request(self) -> None:
        self._num_requests += 1

    def note_failover(self, role: WorkerRole) -> None:
        """A request moved to another instance of ``role`` after one failed."""
        self._num_failovers += 1
        self._metrics.failovers.labels(role.name.lower()).inc()

    def report_failure(self, instance: Instance, error: WorkerError) -> None:
        """A request saw ``error`` from ``instance``; unreachable → dead at once (a dead one keeps
        the reason it went dead with: its calls in flight were cut with it)."""
        self._metrics.worker_errors.labels(error.rpc, error.kind.value).inc()
        if error.kind is WorkerErrorKind.UNAVAILABLE and instance.state is not InstanceState.DEAD:
            self._set_state(instance, InstanceState.DEAD, f"unavailable: {error.detail}")
