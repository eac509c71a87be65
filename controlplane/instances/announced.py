"""Announced workers: the registry's side of workers that register themselves
(docs/design/multihost.md §3; the announcement itself is :mod:`strata_common.announce`).

Each health-check round `InstanceStates.sync` (controlplane/instances/state.py) reads the shared
store's records and the workers' announcements and asks :class:`AnnouncedWorkers`:

- :meth:`~AnnouncedWorkers.register`: every announced endpoint without a record is registered
  through the store's register (two gateways at once get one record) with ``announced`` set and
  the role of :data:`ANNOUNCED_ROLES`; a registration that fails is logged once per endpoint
  and reason and tried again next round.
- :meth:`~AnnouncedWorkers.gone`: the ``announced`` records whose announcement has been
  missing for the grace period (``grace_s``, on the gateway's clock, counted from the first
  round that found it missing: a worker withdraws it at SIGTERM, or it expires); each is
  returned once until :meth:`~AnnouncedWorkers.withdrawn` says its withdrawal (drain, then
  delete once idle: the registry's `_on_announcement_gone`) ended. A round whose scan found no
  announcement at all while announced records exist withdraws nothing until that emptiness has
  itself lasted the grace period: a Redis that restarted empty, or failed over after the
  announcements expired, looks like that until the workers' next renewal (one announce interval).
- :meth:`~AnnouncedWorkers.returned`: the withdrawals under way whose endpoint announces itself
  again (a gap longer than the grace, then back before its drain ended): the registry cancels
  them and undrains the instance when the drain was the withdrawal's own.

A record that is not ``announced`` (configured, added by an operator, launched) is never
withdrawn, whatever the announcements say.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

from controlplane.instances.store import InstanceRecord, RegistryStore, RegistryStoreError
from controlplane.workers.roles import WorkerRole, role_name
from strata_common.announce import AnnouncedRole, Announcement

__all__ = ["ANNOUNCED_ROLES", "DEFAULT_ANNOUNCEMENT_GRACE_S", "AnnouncedWorkers"]

logger = logging.getLogger("controlplane.instances.registry")

DEFAULT_ANNOUNCEMENT_GRACE_S = 10.0
"""How long an announcement may be missing before its instance is withdrawn: the workers'
default ``--announce-ttl`` (a gap of one TTL is one missed renewal plus its expiry)."""

ANNOUNCED_ROLES = {
    AnnouncedRole.PREFILL: WorkerRole.PREFILL,
    AnnouncedRole.DECODE: WorkerRole.DECODE,
    AnnouncedRole.BOTH: WorkerRole.DECODE,
}
"""The instance role an announcement registers. Instances serve prefill or decode only; a
``both`` worker is registered as decode: every request needs a decode, and a decode instance
prefills for itself when no prefill instance is ready (or the prompt is short); `strata admin
set-role` switches it to prefill in place (its Health reports BOTH)."""


class AnnouncedWorkers:
    """Announcements → records, and the announced records whose announcement is gone."""

    def __init__(
        self,
        store: RegistryStore,
        *,
        grace_s: float = DEFAULT_ANNOUNCEMENT_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._grace_s = grace_s
        self._clock = clock
        self._missing_since: dict[str, float] = {}
        """Announced instance ids whose announcement was missing at the last rounds: since when."""
        self._empty_since: float | None = None
        """When the scans started to find no announcement at all while announced records exist."""
        self._withdrawing: dict[str, bool] = {}
        """Instance ids returned by :meth:`gone` whose withdrawal has not ended: whether the
        withdrawal drained it (False: it was drained already, by an operator or another gateway)."""
        self._errors: dict[str, str] = {}
        """Announced endpoints whose registration failed: why (logged once per reason)."""

    async def register(
        self, records: dict[str, InstanceRecord], announcements: dict[str, Announcement]
    ) -> None:
        """Register every announced endpoint that has no record; ``records`` (by id) gets the
        new ones (or the one another gateway registered meanwhile)."""
        registered = {record.endpoint for record in records.values()}
        for endpoint, announcement in announcements.items():
            if endpoint in registered:
                continue
            role = ANNOUNCED_ROLES[announcement.role]
            try:
                record, created = await self._store.register(
                    role, endpoint, launched=False, announced=True
                )
            except RegistryStoreError as exc:
                if self._errors.get(endpoint) != str(exc):
                    logger.warning("cannot register announced worker %s: %s", endpoint, exc)
                self._errors[endpoint] = str(exc)
                continue
            self._errors.pop(endpoint, None)
            if created:
                logger.info(
                    "worker %s announced itself as %s (model %s): registered as %s %s",
                    endpoint,
                    announcement.role.value,
                    announcement.model,
                    role_name(role),
                    record.id,
                )
            records[record.id] = record
        for endpoint in set(self._errors) - set(announcements):
            del self._errors[endpoint]

    def gone(
        self,
        records: dict[str, InstanceRecord],
        announcements: dict[str, Announcement],
        known: Collection[str],
    ) -> list[InstanceRecord]:
        """The ``announced`` records among ``known`` instance ids whose announcement has been
        missing for the grace period and whose withdrawal is not under way (marked under way
        now)."""
        now = self._clock()
        announced = {r.id for r in records.values() if r.announced}
        missing = {i for i in announced if records[i].endpoint not in announcements}
        for instance_id in set(self._missing_since) - missing:
            del self._missing_since[instance_id]
        for instance_id in missing:
            self._missing_since.setdefault(instance_id, now)
        if announcements or not announced:
            self._empty_since = None
        elif self._empty_since is None:
            self._empty_since = now
            logger.warning(
                "no worker announces itself (%d announced instances registered): the registry's "
                "Redis may have lost its data; withdrawing none of them for %g s",
                len(announced),
                self._grace_s,
            )
        if self._empty_since is not None and now - self._empty_since < self._grace_s:
            return []
        found = []
        for record in records.values():
            since = self._missing_since.get(record.id)
            if since is None or now - since < self._grace_s:
                continue
            if record.id not in known or record.id in self._withdrawing:
                continue
            logger.info(
                "instance %s (%s %s): its announcement is gone (missing for %g s): draining it, "
                "then removing it",
                record.id,
                role_name(record.role),
                record.endpoint,
                now - since,
            )
            self._withdrawing[record.id] = False
            found.append(record)
        return found

    def drained(self, instance_id: str) -> None:
        """The withdrawal of ``instance_id`` drained it (it was not draining before)."""
        if instance_id in self._withdrawing:
            self._withdrawing[instance_id] = True

    def returned(
        self, records: dict[str, InstanceRecord], announcements: dict[str, Announcement]
    ) -> list[tuple[str, bool]]:
        """The withdrawals under way whose endpoint announces itself again, as (instance id,
        whether the withdrawal drained it); they are no longer under way."""
        back = []
        for instance_id in list(self._withdrawing):
            record = records.get(instance_id)
            if record is not None and record.endpoint in announcements:
                logger.info(
                    "instance %s (%s) announces itself again: its withdrawal is cancelled",
                    instance_id,
                    record.endpoint,
                )
                back.append((instance_id, self._withdrawing.pop(instance_id)))
        return back

    def withdrawn(self, instance_id: str) -> None:
        """The withdrawal of ``instance_id`` ended (removed, or given up)."""
        self._withdrawing.pop(instance_id, None)

    @property
    def withdrawing(self) -> frozenset[str]:
        return frozenset(self._withdrawing)
