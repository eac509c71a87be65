"""Where the registry's shared instance records live: in this process, or in Redis for HA.

A record is what every gateway must agree on about an instance: its id, role and endpoint, whether
an operator drained it, whether a launcher started it. What each gateway learns for itself — is the
worker answering Health, how many of *its* requests run there — is not shared: every gateway
health-checks every instance on its own, so one gateway's view never depends on another being
alive (docs/design/gateway.md, "Registry").

Two implementations of one protocol:

- `LocalRegistryStore`: a dict; one gateway.
- `RedisRegistryStore`: three keys under a namespace (``strata:registry:``) —
  ``instances`` (hash id → record JSON, sealed with a MAC under the cluster key if there is one:
  docs/design/security.md §5.2), ``endpoints`` (hash endpoint → id) and ``next_id`` (counter).
  Registration (after taking an id: a record is sealed with its id), update and deletion are Lua
  scripts, so two gateways registering the same endpoint at once get the same record, and an
  update never resurrects a deleted record.
  Gateways read the whole hash on each health-check round (a few hundred bytes per instance),
  and the workers' announcements (``announce:ENDPOINT``, strata_common/announce.py), which
  ``InstanceStates.sync`` turns into ``announced`` records.

Rejected: keyspace notifications or pub/sub for changes — a poll per health-check interval is
already the latency of noticing a worker, and a poll cannot miss a message.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from controlplane.workers.roles import WorkerRole
from strata_common.announce import Announcement, AnnouncementReader, AnnouncementStoreError
from strata_common.endpoints import parse_endpoint
from strata_common.records import (
    SEAL_HEADER_BYTES,
    SEAL_PREFIX,
    RecordError,
    RecordSeal,
    SkippedRecords,
)
from strata_common.secrets import redact_url

__all__ = [
    "InstanceRecord",
    "LocalRegistryStore",
    "RedisRegistryStore",
    "RegistryStore",
    "RegistryStoreError",
    "open_registry_store",
]

logger = logging.getLogger(__name__)

_ROLE_BY_NAME = {"prefill": WorkerRole.PREFILL, "decode": WorkerRole.DECODE}
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""What an instance id may look like (ids appear in logs, metrics labels and admin output)."""
MAX_RECORD_CHARS = 4096
"""The longest instance record read (one is a few hundred characters): parsed only below it."""


class RegistryStoreError(RuntimeError):
    """The shared store could not be read or written (e.g. Redis is down)."""


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """The shared part of an instance (see the module docstring)."""

    id: str
    role: WorkerRole
    endpoint: str
    draining: bool = False
    launched: bool = False
    """A launcher started it (some gateway may stop it); False for configured or added ones."""
    announced: bool = False
    """Registered from the worker's announcement (docs/design/multihost.md §3): it is drained
    and deleted once the announcement is gone. False in records written before announcements."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "role": self.role.name.lower(),
                "endpoint": self.endpoint,
                "draining": self.draining,
                "launched": self.launched,
                "announced": self.announced,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> InstanceRecord:
        """The record, validated field by field (a shared store is input like any other: a
        record anyone with write access to it wrote); RegistryStoreError says what is wrong."""
        if len(raw) > MAX_RECORD_CHARS:
            raise RegistryStoreError(
                f"instance record of {len(raw)} characters (at most {MAX_RECORD_CHARS})"
            )
        try:
            data = json.loads(raw)
        except (ValueError, TypeError, RecursionError) as exc:  # deep nesting: RecursionError
            raise RegistryStoreError(f"instance record is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RegistryStoreError("instance record is not a JSON object")
        instance_id = data.get("id")
        if not isinstance(instance_id, str) or not _ID.fullmatch(instance_id):
            raise RegistryStoreError(f"instance record has a bad id {instance_id!r:.80}")
        role = data.get("role")
        if not isinstance(role, str) or role not in _ROLE_BY_NAME:
            raise RegistryStoreError(f"instance record {instance_id} has a bad role {role!r:.40}")
        endpoint = data.get("endpoint")
        try:
            if not isinstance(endpoint, str):
                raise ValueError("not a string")
            parse_endpoint(endpoint)
        except ValueError as exc:
            raise RegistryStoreError(
                f"instance record {instance_id} has a bad endpoint {endpoint!r:.80}: {exc}"
            ) from None
        flags = {name: data.get(name, False) for name in ("draining", "launched", "announced")}
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise RegistryStoreError(f"instance record {instance_id}: {name} is not a bool")
        return cls(instance_id, _ROLE_BY_NAME[role], endpoint, **flags)


class RegistryStore(Protocol):
    """The shared instance records; every method may raise RegistryStoreError."""

    @property
    def description(self) -> str: ...

    async def register(
        self, role: WorkerRole, endpoint: str, *, launched: bool, announced: bool = False
    ) -> tuple[InstanceRecord, bool]:
        """The record of ``endpoint``, created with a new id if there was none; the bool says
        whether it was created."""
        ...

    async def announcements(self) -> dict[str, Announcement] | None:
        """The workers' valid announcements by endpoint; None where a store has none (this
        process's: only a shared registry has announcing workers)."""
        ...

    async def update(self, record: InstanceRecord) -> bool:
        """Replace the record with the same id; False (and no write) if it was deleted."""
        ...

    async def delete(self, instance_id: str) -> None: ...

    async def load(self) -> dict[str, InstanceRecord]: ...

    async def close(self) -> None: ...


class LocalRegistryStore:
    """Records in this process: a gateway without Redis."""

    def __init__(self) -> None:
        self._records: dict[str, InstanceRecord] = {}
        self._next_id = 0

    @property
    def description(self) -> str:
        return "local"

    async def register(
        self, role: WorkerRole, endpoint: str, *, launched: bool, announced: bool = False
    ) -> tuple[InstanceRecord, bool]:
        for record in self._records.values():
            if record.endpoint == endpoint:
                return record, False
        self._next_id += 1
        record = InstanceRecord(
            f"w{self._next_id}", role, endpoint, launched=launched, announced=announced
        )
        self._records[record.id] = record
        return record, True

    async def update(self, record: InstanceRecord) -> bool:
        if record.id not in self._records:
            return False
        self._records[record.id] = record
        return True

    async def delete(self, instance_id: str) -> None:
        self._records.pop(instance_id, None)

    async def load(self) -> dict[str, InstanceRecord]:
        return dict(self._records)

    async def announcements(self) -> dict[str, Announcement] | None:
        return None  # workers announce themselves in a shared registry only

    async def close(self) -> None:
        pass


# KEYS: instances, endpoints. ARGV: endpoint, id, record ("" "" to look only), the id of an
# unusable record to replace (or ""). Returns {0, id, stored}: the endpoint's record; {1, id,
# stored}: the new one, written; {2}: none yet (or only the unusable one) and nothing to write.
_REGISTER_LUA = """
local id = redis.call('HGET', KEYS[2], ARGV[1])
if id and id ~= ARGV[4] then
  local existing = redis.call('HGET', KEYS[1], id)
  if existing then return {0, id, existing} end
end
if ARGV[2] == '' then return {2} end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {1, ARGV[2], ARGV[3]}
"""

# KEYS: instances. ARGV: id, record. Returns 1 if written, 0 if the record is gone.
_UPDATE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: instances, endpoints. ARGV: id, the seal's prefix, the sealed header's length. The
# endpoint index entry goes only if it names this id; a record that does not parse is deleted.
_DELETE_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
if string.sub(raw, 1, string.len(ARGV[2])) == ARGV[2] then
  raw = string.sub(raw, tonumber(ARGV[3]) + 1)
end
local ok, record = pcall(cjson.decode, raw)
if ok and type(record) == 'table' and type(record['endpoint']) == 'string'
    and redis.call('HGET', KEYS[2], record['endpoint']) == ARGV[1] then
  redis.call('HDEL', KEYS[2], record['endpoint'])
end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""


class RedisRegistryStore:
    """Records in Redis or Valkey (redis.asyncio), shared by every gateway using the same URL.

    ``cluster_key``: with it every record is sealed with a MAC that binds it to its id
    (:mod:`strata_common.records`) and a record without a valid one is skipped like any bad
    record; the ``endpoints`` index is not sealed, but a record it leads to must have its
    endpoint, else registering that endpoint replaces it (docs/design/security.md §5.2)."""

    def __init__(
        self, url: str, *, namespace: str = "strata", cluster_key: bytes | None = None
    ) -> None:
        import redis.asyncio as aioredis  # only HA gateways need it

        self._url = url
        self._redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=2.0
        )
        prefix = f"{namespace}:registry:"
        self._instances_key = prefix + "instances"
        self._endpoints_key = prefix + "endpoints"
        self._next_id_key = prefix + "next_id"
        self._register = self._redis.register_script(_REGISTER_LUA)
        self._update = self._redis.register_script(_UPDATE_LUA)
        self._delete = self._redis.register_script(_DELETE_LUA)
        self._seal = RecordSeal(cluster_key)
        self._skipped = SkippedRecords(logger, "registry record")
        self._announcements = AnnouncementReader(self._redis, self._seal, namespace=namespace)

    @property
    def description(self) -> str:
        return redact_url(self._url)

    def _sealed(self, record: InstanceRecord) -> bytes:
        return self._seal.seal((self._instances_key, record.id), record.to_json())

    def _opened(self, instance_id: bytes | str, stored: bytes) -> InstanceRecord:
        """The record stored under ``instance_id``: MAC checked, fields validated, and stored
        under its own id; RegistryStoreError otherwise."""
        key = instance_id.encode() if isinstance(instance_id, str) else instance_id
        try:
            body = self._seal.open((self._instances_key, key), stored)
        except RecordError as exc:
            raise RegistryStoreError(f"instance record: {exc}") from None
        record = InstanceRecord.from_json(body)
        if record.id.encode() != key:
            raise RegistryStoreError(f"instance record {record.id} is stored under {key!r}")
        return record

    async def register(
        self, role: WorkerRole, endpoint: str, *, launched: bool, announced: bool = False
    ) -> tuple[InstanceRecord, bool]:
        """The endpoint's record, or a new one. An existing record that is unusable (fails its
        MAC or validation, or is another endpoint's: the ``endpoints`` index is not sealed) is
        replaced by a new record under a new id, logged; except a sealed record this gateway
        cannot check (no cluster key): RegistryStoreError."""
        keys = [self._instances_key, self._endpoints_key]
        reply = await self._call(self._register, keys, [endpoint, "", "", ""])
        replace: str | bytes = ""
        if reply[0] == 0:
            _, bad_id, stored = reply
            try:
                return self._endpoint_record(endpoint, bad_id, stored), False
            except RegistryStoreError as exc:
                if not self._seal.enabled and bytes(stored).startswith(SEAL_PREFIX):
                    raise
                replace = bad_id
                logger.warning(
                    "registry: replacing the record of %s under %r: %s", endpoint, bad_id, exc
                )
        try:  # an id lost to a concurrent registration is only a gap
            number = await self._redis.incr(self._next_id_key)
        except Exception as exc:
            raise RegistryStoreError(f"registry {redact_url(self._url)}: {exc}") from exc
        record = InstanceRecord(
            f"w{number}", role, endpoint, launched=launched, announced=announced
        )
        args: list[str | bytes] = [endpoint, record.id, self._sealed(record), replace]
        reply = await self._call(self._register, keys, args)
        if reply[0] == 1:
            return record, True
        _, other_id, stored = reply  # another gateway registered it meanwhile
        return self._endpoint_record(endpoint, other_id, stored), False

    def _endpoint_record(self, endpoint: str, instance_id: bytes, stored: bytes) -> InstanceRecord:
        record = self._opened(instance_id, stored)
        if record.endpoint != endpoint:
            raise RegistryStoreError(
                f"the registry index maps {endpoint} to {record.id}, whose endpoint is "
                f"{record.endpoint}"
            )
        return record

    async def update(self, record: InstanceRecord) -> bool:
        reply = await self._call(
            self._update, [self._instances_key], [record.id, self._sealed(record)]
        )
        return bool(reply)

    async def delete(self, instance_id: str) -> None:
        args = [instance_id, SEAL_PREFIX.decode(), str(SEAL_HEADER_BYTES)]
        await self._call(self._delete, [self._instances_key, self._endpoints_key], args)

    async def load(self) -> dict[str, InstanceRecord]:
        try:
            raw: dict[bytes, bytes] = await self._redis.hgetall(self._instances_key)
        except Exception as exc:  # redis.RedisError, OSError: the store is unreachable
            raise RegistryStoreError(f"registry {redact_url(self._url)}: {exc}") from exc
        records: dict[str, InstanceRecord] = {}
        skipped: list[bytes] = []
        for key, value in raw.items():
            try:
                record = self._opened(key, value)
            except RegistryStoreError as exc:
                self._skipped.note(key, str(exc))
                skipped.append(key)
                continue
            records[record.id] = record
        self._skipped.forget_except(skipped)
        return records

    async def announcements(self) -> dict[str, Announcement]:
        """Every valid announcement (strata_common/announce.py: a bad one is skipped and logged
        once per key)."""
        try:
            return await self._announcements.read()
        except AnnouncementStoreError as exc:
            raise RegistryStoreError(f"registry {redact_url(self._url)}: {exc}") from exc

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(self, script: Any, keys: list[str], args: Sequence[str | bytes]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except Exception as exc:
            raise RegistryStoreError(f"registry {redact_url(self._url)}: {exc}") from exc


def open_registry_store(url: str, cluster_key: bytes | None = None) -> RegistryStore:
    """``""`` → a LocalRegistryStore; ``redis://`` / ``rediss://`` / ``unix://`` → Redis, its
    records sealed under ``cluster_key`` if one is given."""
    if not url:
        return LocalRegistryStore()
    return RedisRegistryStore(url, cluster_key=cluster_key)
