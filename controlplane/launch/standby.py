"""Standby workers: engines started ahead of need, so that adding one takes seconds.

Starting a `strata worker` is mostly three Python interpreters importing torch and vLLM (the
worker, vLLM's engine core and its executor worker; the CPU platform forces ``spawn``), then the
model load and the KV cache: ~29 s for the tiny model on an idle core here, a minute for SmolLM2
on a busy host (docs/benchmarks.md, "Adding an engine"). None of that depends on the request
load, so it can happen before the engine is needed.

:class:`StandbyLauncher` wraps a :class:`~controlplane.launch.launcher.LocalProcessLauncher` and
implements :class:`~controlplane.instances.types.Launcher`. It keeps ``per_role`` workers of each
serving role started but not registered: no gateway knows them, so they get no request. A
``launch(role)`` — `strata admin scale`, `set-role`, the restart of a dead launched worker —
hands out a standby of that role (a ready one first, else the one that started first) and starts
its replacement in the background; the registry then registers it, its Health answers ready at
once and it takes a calibrated sibling's latency profile, so it serves within a health check.
With no standby left it launches as before.

- **Cost.** A standby holds its engine's memory (weights + KV cache) and its cores; idle, it
  uses no CPU. On a GPU host it holds a GPU, which is why the default is 0 standbys.
- **Start-up order.** Standbys start only once :meth:`start` is called, which the gateway does
  after its start-up workers are ready: they never compete with the pool's own start. They start
  without the launcher's start-up priority boost, so they do not take CPU from serving engines.
- **Cores.** A standby takes cores like any worker; when cores free up, the launcher moves a
  serving engine before a standby (``LocalWorker.standby``).
- **Failures.** A standby that exits is replaced, with an exponential back-off after each
  failure in a row (``retry_s`` doubling up to ``max_retry_s``); a handed-out worker that is
  still starting is the registry's like any launch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from controlplane.instances.types import LaunchedWorker
from controlplane.workers.roles import WorkerRole, role_name

__all__ = ["StandbyLauncher", "StandbyWorker", "WorkerStarter"]

logger = logging.getLogger(__name__)


class StandbyWorker(LaunchedWorker, Protocol):
    """A launched worker that says when it is ready and whether it is held in reserve."""

    standby: bool

    def printed_ready(self) -> bool: ...

    @property
    def tail(self) -> tuple[str, ...]: ...


class WorkerStarter(Protocol):
    """What the standby pool needs of the launcher it wraps."""

    async def launch(self, role: WorkerRole, *, standby: bool = False) -> StandbyWorker: ...

    def rebalance(self) -> None:
        """Spread the engines over the cores again (a standby now serves: it moves first)."""
        ...

    async def close(self) -> None: ...


class StandbyLauncher:
    """Keeps ``per_role`` started workers of each role in reserve (implements Launcher)."""

    def __init__(
        self,
        launcher: WorkerStarter,
        *,
        per_role: int,
        roles: Sequence[WorkerRole] = (WorkerRole.PREFILL, WorkerRole.DECODE),
        check_interval_s: float = 1.0,
        retry_s: float = 5.0,
        max_retry_s: float = 300.0,
        stop_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_role < 1:
            raise ValueError(f"per_role must be >= 1, got {per_role}")
        self._launcher = launcher
        self._per_role = per_role
        self._roles = tuple(roles)
        self._check_interval_s = check_interval_s
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._stop_timeout_s = stop_timeout_s
        self._clock = clock
        self._reserve: dict[WorkerRole, list[StandbyWorker]] = {r: [] for r in self._roles}
        self._failures: dict[WorkerRole, int] = dict.fromkeys(self._roles, 0)
        self._next_try: dict[WorkerRole, float] = dict.fromkeys(self._roles, 0.0)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.num_taken = 0
        """Launches served from the reserve (the rest started a worker)."""

    def reserve(self, role: WorkerRole) -> tuple[StandbyWorker, ...]:
        """The standbys of ``role`` now, in the order they were started."""
        return tuple(self._reserve.get(role, ()))

    def start(self) -> None:
        """Start filling the reserve (the gateway calls this once its pool is ready)."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._maintain(), name="standby-workers")

    async def launch(self, role: WorkerRole) -> LaunchedWorker:
        worker = self._take(role)
        if worker is None:
            return await self._launcher.launch(role)
        self.num_taken += 1
        worker.standby = False
        self._launcher.rebalance()
        logger.info(
            "standby: %s worker %s handed out (%s)",
            role_name(role),
            worker.endpoint,
            "ready" if worker.printed_ready() else "still starting",
        )
        self._wake.set()  # start its replacement now
        return worker

    async def close(self) -> None:
        """Stop the reserve, then the wrapped launcher (which stops every worker it started)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        workers = [w for ws in self._reserve.values() for w in ws]
        for ws in self._reserve.values():
            ws.clear()
        await asyncio.gather(*(w.stop(timeout_s=self._stop_timeout_s) for w in workers))
        await self._launcher.close()

    def _take(self, role: WorkerRole) -> StandbyWorker | None:
        """The best standby of ``role``: a ready one, else the one furthest into its start."""
        reserve = self._reserve.get(role)
        if not reserve:
            return None
        alive = [w for w in reserve if w.alive()]
        if not alive:
            return None
        chosen = next((w for w in alive if w.printed_ready()), alive[0])
        reserve.remove(chosen)
        return chosen

    async def _maintain(self) -> None:
        while not self._closed:
            for role in self._roles:
                try:
                    await self._refill(role)
                except asyncio.CancelledError:
                    raise
                except Exception:  # keep the reserve's monitor alive; retry after the back-off
                    logger.exception("standby: starting a %s worker failed", role_name(role))
                    self._failed(role)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._check_interval_s)

    async def _refill(self, role: WorkerRole) -> None:
        reserve = self._reserve[role]
        for worker in [w for w in reserve if not w.alive()]:
            reserve.remove(worker)
            tail = "\n".join(worker.tail[-10:])
            logger.warning(
                "standby: %s worker %s exited before it was needed; replacing it:\n%s",
                role_name(role),
                worker.endpoint,
                tail,
            )
            await worker.stop(timeout_s=self._stop_timeout_s)  # reap it, free its cores
            self._failed(role)
        for worker in reserve:
            if worker.printed_ready():
                self._failures[role] = 0
        while len(reserve) < self._per_role and not self._closed:
            if self._clock() < self._next_try[role]:
                return
            worker = await self._launcher.launch(role, standby=True)
            reserve.append(worker)
            logger.info("standby: started a %s worker on %s", role_name(role), worker.endpoint)

    def _failed(self, role: WorkerRole) -> None:
        self._failures[role] += 1
        delay = min(self._max_retry_s, self._retry_s * 2 ** (self._failures[role] - 1))
        self._next_try[role] = self._clock() + delay
