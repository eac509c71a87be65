"""The worker's announcement in the gateways' shared registry (``--announce``;
docs/design/multihost.md §3; the contract itself is :mod:`strata_common.announce`).

:class:`AnnouncementLoop` writes the announcement once the gRPC server is ready (:meth:`start`),
renews it every ``--announce-interval`` (Redis expires it ``--announce-ttl`` after the last
renewal), and on a graceful stop deletes it (:meth:`stop`) before the worker stops serving, so
every gateway drains the worker on its next round instead of finding it gone. Redis down is
never fatal: a failed write is logged (once, and again when it works), and retried at the next
interval; the worker serves meanwhile. It needs no engine: tests run it against a real Valkey.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from dataplane.config import WorkerConfig
from strata_common.announce import (
    AnnouncedRole,
    Announcement,
    AnnouncementStoreError,
    Announcer,
    new_boot_id,
)

__all__ = ["AnnouncementLoop", "announcement_loop"]

logger = logging.getLogger("strata.worker.announce")

WITHDRAW_TIMEOUT_S = 2.0
"""The longest a stopping worker waits for Redis to delete its announcement (an unreachable
Redis must not hold up the drain; the announcement then expires within its TTL)."""


class AnnouncementLoop:
    """Publishes ``announcer``'s announcement now and every ``interval_s``; withdraws it on
    :meth:`stop`. ``sleep``: the wait between renewals (a test drives it)."""

    def __init__(
        self,
        announcer: Announcer,
        *,
        interval_s: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.announcer = announcer
        self._interval_s = interval_s
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.num_published = 0
        """Successful writes (the first and each renewal)."""

    async def start(self) -> None:
        """Announce now (a failure is logged, not raised), then renew every interval."""
        await self._publish()
        self._task = asyncio.create_task(self._renew(), name="strata-announce")

    async def stop(self) -> None:
        """Stop renewing and delete the announcement (if it is still this process's); a
        failure, or no answer within ``WITHDRAW_TIMEOUT_S``, is logged (the announcement then
        expires within its TTL)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            deleted = await asyncio.wait_for(self.announcer.withdraw(), WITHDRAW_TIMEOUT_S)
        except (AnnouncementStoreError, TimeoutError) as exc:
            logger.warning(
                "could not withdraw the announcement (it expires by itself): %s",
                str(exc) or f"no answer within {WITHDRAW_TIMEOUT_S:g} s",
            )
        else:
            endpoint = self.announcer.announcement.endpoint
            if deleted:
                logger.info("announcement of %s withdrawn", endpoint)
            else:
                logger.info(
                    "announcement of %s was gone already (expired, or replaced by a successor)",
                    endpoint,
                )
        finally:
            await self.announcer.close()

    async def _renew(self) -> None:
        while True:
            await self._sleep(self._interval_s)
            await self._publish()

    async def _publish(self) -> None:
        try:
            await self.announcer.publish()
        except AnnouncementStoreError as exc:
            if not self._failing:
                logger.warning("announcing failed, retrying every %g s: %s", self._interval_s, exc)
            self._failing = True
            return
        self.num_published += 1
        if self._failing or self.num_published == 1:
            ann = self.announcer.announcement
            logger.info(
                "announced %s as %s in %s (key %s)",
                ann.endpoint,
                ann.role.value,
                self.announcer.description,
                self.announcer.key,
            )
        self._failing = False


def announcement_loop(
    config: WorkerConfig, port: int, cluster_key: bytes | None
) -> AnnouncementLoop | None:
    """The loop for a worker serving on ``port`` (None without ``--announce``): it announces
    ``ADVERTISED_HOST:PORT``, sealed with the cluster key if the worker has one."""
    if config.announce is None:
        return None
    if cluster_key is None:
        logger.warning(
            "announcing without --cluster-key-file: the announcement is not sealed, so gateways "
            "that have a cluster key skip it"
        )
    announcement = Announcement(
        endpoint=config.advertised_endpoint(port),
        role=AnnouncedRole(config.role.value),
        model=str(config.model_dir),
        boot=new_boot_id(),
    )
    announcer = Announcer(
        config.announce, announcement, cluster_key=cluster_key, ttl_s=config.announce_ttl_s
    )
    return AnnouncementLoop(announcer, interval_s=config.announce_interval_s)
