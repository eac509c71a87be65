"""Where the registry's shared instance records live: in this process, or in Redis for HA.

A record is what every gateway must agree on about an instance: its id, role and endpoint, whether
an operator drained it, whether a launcher started it. What each gateway learns for itself — is the
worker answering Health, how many of *its* requests run there — is not shared: every gateway
health-checks every instance on its own, so one gateway's view never depends on another being
alive (docs/design/gateway.md, "Registry").

Two implementations of one protocol:

- `LocalRegistryStore`: a dict; one gateway.
- `RedisRegistryStore`: three keys under a namespace (``strata:registry:``) —
  ``instances`` (hash id → record JSON), ``endpoints`` (hash endpoint → id) and ``next_id``
  (counter). Registration, update and deletion are Lua scripts, so two gateways registering the
  same endpoint at once get the same record, and an update never resurrects a deleted record.
  Gateways read the whole hash on each health-check round (a few hundred bytes per instance).

Rejected: keyspace notifications or pub/sub for changes — a poll per health-check interval is
already the latency of noticing a worker, and a poll cannot miss a message.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

from controlplane.workers.roles import WorkerRole
from strata_common.endpoints import parse_endpoint
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

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "role": self.role.name.lower(),
                "endpoint": self.endpoint,
                "draining": self.draining,
                "launched": self.launched,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> InstanceRecord:
        """The record, validated field by field (a shared store is input like any other: a
        record anyone with write access to it wrote); RegistryStoreError says what is wrong."""
        try:
            data = json.loads(raw)
        except (ValueError, TypeError) as exc:
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
        flags = {name: data.get(name, False) for name in ("draining", "launched")}
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise RegistryStoreError(f"instance record {instance_id}: {name} is not a bool")
        return cls(instance_id, _ROLE_BY_NAME[role], endpoint, **flags)


class RegistryStore(Protocol):
    """The shared instance records; every method may raise RegistryStoreError."""

    @property
    def description(self) -> str: ...

    async def register(
        self, role: WorkerRole, endpoint: str, *, launched: bool
    ) -> tuple[InstanceRecord, bool]:
        """The record of ``endpoint``, created with a new id if there was none; the bool says
        whether it was created."""
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
        self, role: WorkerRole, endpoint: str, *, launched: bool
    ) -> tuple[InstanceRecord, bool]:
        for record in self._records.values():
            if record.endpoint == endpoint:
                return record, False
        self._next_id += 1
        record = InstanceRecord(f"w{self._next_id}", role, endpoint, launched=launched)
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

    async def close(self) -> None:
        pass


# KEYS: instances, endpoints, next_id. ARGV: endpoint, record JSON with an empty id.
# Returns {created (0/1), record JSON}.
_REGISTER_LUA = """
local id = redis.call('HGET', KEYS[2], ARGV[1])
if id then
  local existing = redis.call('HGET', KEYS[1], id)
  if existing then return {0, existing} end
end
id = 'w' .. redis.call('INCR', KEYS[3])
local record = cjson.decode(ARGV[2])
record['id'] = id
local encoded = cjson.encode(record)
redis.call('HSET', KEYS[1], id, encoded)
redis.call('HSET', KEYS[2], ARGV[1], id)
return {1, encoded}
"""

# KEYS: instances. ARGV: id, record JSON. Returns 1 if written, 0 if the record is gone.
_UPDATE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: instances, endpoints. ARGV: id.
_DELETE_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local endpoint = cjson.decode(raw)['endpoint']
if redis.call('HGET', KEYS[2], endpoint) == ARGV[1] then redis.call('HDEL', KEYS[2], endpoint) end
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""


class RedisRegistryStore:
    """Records in Redis or Valkey (redis.asyncio), shared by every gateway using the same URL."""

    def __init__(self, url: str, *, namespace: str = "strata") -> None:
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
        self._skipped = _SkippedRecords()

    @property
    def description(self) -> str:
        return redact_url(self._url)

    async def register(
        self, role: WorkerRole, endpoint: str, *, launched: bool
    ) -> tuple[InstanceRecord, bool]:
        template = InstanceRecord("", role, endpoint, launched=launched).to_json()
        reply = await self._call(
            self._register,
            [self._instances_key, self._endpoints_key, self._next_id_key],
            [endpoint, template],
        )
        created, raw = reply
        return InstanceRecord.from_json(raw), bool(created)

    async def update(self, record: InstanceRecord) -> bool:
        reply = await self._call(self._update, [self._instances_key], [record.id, record.to_json()])
        return bool(reply)

    async def delete(self, instance_id: str) -> None:
        await self._call(self._delete, [self._instances_key, self._endpoints_key], [instance_id])

    async def load(self) -> dict[str, InstanceRecord]:
        try:
            raw: dict[bytes, bytes] = await self._redis.hgetall(self._instances_key)
        except Exception as exc:  # redis.RedisError, OSError: the store is unreachable
            raise RegistryStoreError(f"registry {redact_url(self._url)}: {exc}") from exc
        records: dict[str, InstanceRecord] = {}
        for key, value in raw.items():
            try:
                record = InstanceRecord.from_json(value)
                if record.id.encode() != key:
                    raise RegistryStoreError(f"instance record {record.id} is stored under {key!r}")
            except RegistryStoreError as exc:
                self._skipped.note(key, str(exc))
                continue
            records[record.id] = record
        self._skipped.forget_except(raw.keys())
        return records

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(self, script: Any, keys: list[str], args: list[str]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except Exception as exc:
            raise RegistryStoreError(f"registry {redact_url(self._url)}: {exc}") from exc


class _SkippedRecords:
    """Records skipped because they are malformed, each logged once per reason (a health-check
    round reads every record every half second; a bad one must neither stop the others nor
    flood the log)."""

    def __init__(self) -> None:
        self._reasons: dict[bytes, str] = {}

    def note(self, key: bytes, reason: str) -> None:
        if self._reasons.get(key) != reason:
            self._reasons[key] = reason
            logger.warning("registry: skipping the record under %r: %s", key[:80], reason)

    def forget_except(self, keys: Any) -> None:
        """Forget records no longer stored (a record fixed or deleted is logged again if it
        turns bad again)."""
        for key in set(self._reasons) - set(keys):
            del self._reasons[key]


def open_registry_store(url: str) -> RegistryStore:
    """``""`` → a LocalRegistryStore; ``redis://`` / ``rediss://`` / ``unix://`` → Redis."""
    if not url:
        return LocalRegistryStore()
    return RedisRegistryStore(url)
