"""Announced workers: the registry's side of workers that register themselves
(docs/design/multihost.md §3; the announcement itself is :mod:`strata_common.announce`).

Each health-check round `InstanceStates.sync` (controlplane/instances/state.py) reads the shared
store's records and the workers' announcements and asks :class:`AnnouncedWorkers`:

- :meth:`~AnnouncedWorkers.register`: every announced endpoint without a record is registered
  through the store's register (two gateways at once get one record) with ``announced`` set and
  the role of :data:`ANNOUNCED_ROLES`; a registration that fails is logged once per endpoint
  and reason and tried again next round.
- :meth:`~AnnouncedWorkers.gone`: the ``announced`` records whose announcement is gone
  (withdrawn by the worker at SIGTERM, or expired); each is returned once until
  :meth:`~AnnouncedWorkers.withdrawn` says its withdrawal (drain, then delete once idle: the
  registry's `_on_announcement_gone`) ended.

A record that is not ``announced`` (configured, added by an operator, launched) is never
withdrawn, whatever the announcements say.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from controlplane.instances.store import InstanceRecord, RegistryStore, RegistryStoreError
from controlplane.workers.roles import WorkerRole, role_name
from strata_common.announce import AnnouncedRole, Announcement

__all__ = ["ANNOUNCED_ROLES", "AnnouncedWorkers"]

logger = logging.getLogger("controlplane.instances.registry")

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

    def __init__(self, store: RegistryStore) -> None:
        self._store = store
        self._withdrawing: set[str] = set()
        """Instance ids returned by :meth:`gone` whose withdrawal has not ended."""
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
        """The ``announced`` records among ``known`` instance ids whose announcement is gone and
        whose withdrawal is not under way (marked under way now)."""
        found = []
        for record in records.values():
            if not record.announced or record.endpoint in announcements:
                continue
            if record.id not in known or record.id in self._withdrawing:
                continue
            logger.info(
                "instance %s (%s %s): its announcement is gone: draining it, then removing it",
                record.id,
                role_name(record.role),
                record.endpoint,
            )
            self._withdrawing.add(record.id)
            found.append(record)
        return found

    def withdrawn(self, instance_id: str) -> None:
        """The withdrawal of ``instance_id`` ended (removed, or given up)."""
        self._withdrawing.discard(instance_id)

    @property
    def withdrawing(self) -> frozenset[str]:
        return frozenset(self._withdrawing)
