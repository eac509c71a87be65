"""API keys kept in Redis, shared by every gateway and changed without a restart
(docs/design/security.md §6.1).

The hash ``NAMESPACE:api-keys`` (``strata:api-keys``) maps the SHA-256 of each key (64 hex
digits: :func:`~controlplane.tenants.api_key_digest`, never the key) to its tenant, each value
sealed with a MAC bound to the hash and the digest (:mod:`strata_common.records`): without the
cluster key nobody can add a key, move a tenant's name onto another digest or rename a key's
tenant. Operators change it with ``strata tenants add/remove/list`` (strata/tenants_cli.py);
gateways given ``--api-keys-redis URL`` read it at start and every ``--api-keys-refresh``
(:class:`LiveApiKeys`), so a removed key stops working within one interval everywhere.

A record that fails its MAC or names a bad tenant is skipped and logged once per digest and
reason. Redis unreachable during a refresh: the gateway keeps the table it has (logged once, and
again when it recovers); unreachable at start: the gateway does not start.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any, Final

from controlplane.tenants import (
    MAX_TENANT_CHARS,
    ApiKeys,
    TenantError,
    api_key_digest,
    check_api_key,
    check_tenant,
)
from strata_common.records import RecordSeal, SkippedRecords
from strata_common.secrets import redact_url

__all__ = ["ApiKeyStore", "ApiKeyStoreError", "LiveApiKeys"]

logger = logging.getLogger(__name__)

_DIGEST_HEX: Final = re.compile(rb"[0-9a-f]{64}")


class ApiKeyStoreError(RuntimeError):
    """Redis could not be read or written."""


class ApiKeyStore:
    """The hash ``NAMESPACE:api-keys`` (redis.asyncio); needs the cluster key (its records are
    sealed: an unsealed key table in a shared store would let anyone with Redis access in)."""

    def __init__(self, url: str, cluster_key: bytes, *, namespace: str = "strata") -> None:
        import redis.asyncio as aioredis  # only gateways and tools that use it

        self._url = url
        self._redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=2.0
        )
        self.key = f"{namespace}:api-keys"
        self._seal = RecordSeal(cluster_key)
        self._skipped = SkippedRecords(logger, "API key record")

    @property
    def description(self) -> str:
        return f"{redact_url(self._url)} {self.key}"

    async def load(self) -> dict[bytes, str]:
        """Digest → tenant for every valid record (bad ones skipped, logged once each)."""
        raw: dict[bytes, bytes] = await self._do(self._redis.hgetall(self.key))
        table: dict[bytes, str] = {}
        skipped: list[bytes] = []
        for field, value in raw.items():
            try:
                if not _DIGEST_HEX.fullmatch(field):
                    raise TenantError("the field is not a SHA-256 in lower-case hex")
                body = self._seal.open((self.key, field), value, max_body_bytes=MAX_TENANT_CHARS)
                tenant = body.decode()
                check_tenant(tenant, "tenant")
            except ValueError as exc:  # RecordError, TenantError, UnicodeDecodeError
                self._skipped.note(field, str(exc))
                skipped.append(field)
                continue
            table[bytes.fromhex(field.decode())] = tenant
        self._skipped.forget_except(skipped)
        return table

    async def add(self, key: str, tenant: str) -> bool:
        """Give ``key`` to ``tenant``; False if it already was. TenantError for a bad key or
        tenant, or a key that belongs to another tenant (remove it first)."""
        check_api_key(key, "API key")
        check_tenant(tenant, "tenant")
        field = api_key_digest(key).hex()
        current = (await self.load()).get(bytes.fromhex(field))
        if current == tenant:
            return False
        if current is not None:
            raise TenantError(f"this key belongs to tenant {current}; remove it first")
        sealed = self._seal.seal((self.key, field), tenant)
        await self._do(self._redis.hset(self.key, field, sealed))
        return True

    async def remove_key(self, digest: bytes) -> bool:
        """Remove the key with this digest (whatever its record holds); False if there is none."""
        return bool(await self._do(self._redis.hdel(self.key, digest.hex())))

    async def remove_tenant(self, tenant: str) -> int:
        """Remove every valid key of ``tenant``; how many."""
        digests = [d.hex() for d, t in (await self.load()).items() if t == tenant]
        if not digests:
            return 0
        return int(await self._do(self._redis.hdel(self.key, *digests)))

    async def close(self) -> None:
        await self._redis.aclose()

    async def _do(self, call: Any) -> Any:
        try:
            return await call
        except Exception as exc:  # redis.RedisError, OSError
            raise ApiKeyStoreError(f"API keys at {self.description}: {exc}") from exc


class LiveApiKeys:
    """A gateway's API keys: the static ones (``--api-key``, ``--api-keys-file``) plus the Redis
    hash, read again every ``interval_s``; ``on_change`` gets each new table."""

    def __init__(
        self,
        static: ApiKeys,
        store: ApiKeyStore,
        on_change: Callable[[ApiKeys], None],
        *,
        interval_s: float,
    ) -> None:
        self._static = static
        self._store = store
        self._on_change = on_change
        self._interval_s = interval_s
        self.table = static.merged({})
        """The table now (keys required: an empty hash never opens the API)."""
        self._failing = False

    async def refresh(self) -> ApiKeys:
        """Read the hash once and publish the table; ApiKeyStoreError if Redis fails."""
        table = self._static.merged(await self._store.load())
        if table.by_digest != self.table.by_digest:
            logger.info(
                "API keys: %d keys of %d tenants (%s)",
                len(table.by_digest),
                len(table.tenants),
                self._store.description,
            )
        self.table = table
        self._on_change(table)
        return table

    async def run(self) -> None:
        """Refresh forever (cancel to stop); a failure keeps the last table."""
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.refresh()
            except ApiKeyStoreError as exc:
                if not self._failing:
                    logger.error("API keys: cannot refresh, keeping the last table: %s", exc)
                self._failing = True
                continue
            except Exception:  # a bug must not end the refresh (removed keys would stay valid)
                if not self._failing:
                    logger.exception("API keys: refresh failed, keeping the last table")
                self._failing = True
                continue
            if self._failing:
                logger.warning("API keys: refreshed again (%s)", self._store.description)
            self._failing = False

    async def close(self) -> None:
        await self._store.close()
