"""The worker's shutdown on SIGTERM: withdraw, drain, then stop (docs/design/multihost.md §3).

1. The announcement is withdrawn (gateways withdraw the instance once it has been gone for their
   announcement grace).
2. Health reports ``draining`` for ``--drain-notice`` (at least one gateway health round): every
   gateway stops picking this worker, and neither cuts nor fails over what runs on it
   (controlplane/instances/state.py) — "not ready" would mark it dead and fail those over.
3. The requests in flight (the gRPC handlers', and the engine's until it processed their ends)
   run to their end, for ``--drain-timeout`` at most.
4. The gRPC server stops (a short grace for the replies being written).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

import grpc

from dataplane.announcer import AnnouncementLoop

__all__ = ["STOP_GRACE_S", "drain_and_stop"]

logger = logging.getLogger("strata.worker")

POLL_S = 0.05
STOP_GRACE_S = 5.0
"""The gRPC server's grace once the requests are done (or the drain timed out)."""


class Draining(Protocol):
    draining: bool

    def num_in_flight(self) -> int: ...


async def drain_and_stop(
    worker: Draining,
    server: grpc.aio.Server,
    announcement: AnnouncementLoop | None,
    *,
    notice_s: float,
    timeout_s: float,
    clock: Callable[[], float] | None = None,
) -> None:
    """Steps 1-4 above."""
    if announcement is not None:
        await announcement.stop()
    worker.draining = True
    logger.info("SIGTERM: draining (Health says so for %g s, then requests end)", notice_s)
    await asyncio.sleep(notice_s)
    now = clock or asyncio.get_running_loop().time
    deadline = now() + timeout_s
    while (left := worker.num_in_flight()) > 0:
        if now() >= deadline:
            logger.warning(
                "drain timeout (%g s): stopping with %d requests in flight", timeout_s, left
            )
            break
        await asyncio.sleep(POLL_S)
    await server.stop(grace=STOP_GRACE_S)
