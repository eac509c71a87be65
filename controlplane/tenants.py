"""Tenants: who an API request is, from its API key, and the KV namespace that keeps each
tenant's cache to itself (docs/design/security.md §6.1).

- :class:`ApiKeys`: the table of API keys, each mapped to a tenant: ``--api-key KEY`` (each key
  its own tenant, named ``key-`` + 12 hex digits of the key's SHA-256, so logs never show the
  key), ``--api-keys-file FILE`` (``KEY TENANT`` per line; ``#`` comments; a 0600 file), and the
  Redis hash of :mod:`controlplane.tenant_keys` (``--api-keys-redis``, refreshed). Lookups
  compare SHA-256 digests in constant time. No keys configured: every request is the one
  anonymous tenant (a single-user deployment).
- :func:`tenant_namespace`: the cache salt a request's blocks are keyed under: a keyed hash of
  the tenant (the cluster's ``tenants`` key; nobody without it can compute another tenant's
  namespace), subdivided by the client's own ``cache_salt``. The gateway sends it to the workers
  as the request's cache salt, so vLLM's own prefix cache, the store's blocks and the prefix
  index all keep tenants apart: no request of one tenant can hit, or time, another's blocks.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from strata_common.credentials import owner_only

__all__ = [
    "ANONYMOUS",
    "MAX_TENANT_CHARS",
    "MIN_API_KEY_CHARS",
    "ApiKeys",
    "TenantError",
    "api_key_digest",
    "check_api_key",
    "check_tenant",
    "tenant_namespace",
]

ANONYMOUS: Final = ""
"""The tenant of every request when no API key is configured."""
MIN_API_KEY_CHARS: Final = 16
MAX_TENANT_CHARS: Final = 64


class TenantError(ValueError):
    """A key table that cannot be used (the message names the file and line), or a request
    without a valid key (the message is safe to send back)."""


def api_key_digest(key: str) -> bytes:
    """What is kept of an API key (in memory, and in Redis: controlplane/tenant_keys.py): its
    SHA-256, never the key."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def check_api_key(key: str, where: str) -> None:
    if len(key) < MIN_API_KEY_CHARS or not key.isprintable() or any(c.isspace() for c in key):
        raise TenantError(
            f"{where}: an API key is at least {MIN_API_KEY_CHARS} printable characters, no spaces"
        )


def check_tenant(tenant: str, where: str) -> None:
    if not (0 < len(tenant) <= MAX_TENANT_CHARS) or not all(
        c.isalnum() or c in "._-" for c in tenant
    ):
        raise TenantError(
            f"{where}: a tenant name is 1..{MAX_TENANT_CHARS} letters, digits, '.', '_' or '-'"
        )


@dataclass(frozen=True)
class ApiKeys:
    """API key digests → tenant. Empty: keys are not required (every request is anonymous)."""

    by_digest: Mapping[bytes, str]
    keys_required: bool = False
    """Keys are required even while the table is empty (they come from Redis: an empty or
    unreadable hash must not open the API to everyone)."""

    @property
    def required(self) -> bool:
        return self.keys_required or bool(self.by_digest)

    def merged(self, extra: Mapping[bytes, str]) -> ApiKeys:
        """This table plus ``extra`` (digest → tenant; this table's tenant wins for a digest in
        both), keys required."""
        return ApiKeys({**extra, **self.by_digest}, keys_required=True)

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(self.by_digest.values())

    @classmethod
    def load(cls, keys: Iterable[str] = (), keys_file: Path | None = None) -> ApiKeys:
        """From ``--api-key`` values and an ``--api-keys-file``; TenantError names what is wrong."""
        table: dict[bytes, str] = {}
        for key in keys:
            check_api_key(key, "--api-key")
            table[api_key_digest(key)] = "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]
        if keys_file is not None:
            if not owner_only(keys_file):
                raise TenantError(
                    f"{keys_file} must be a regular file of this user nobody else can read "
                    f"(chmod 600 {keys_file})"
                )
            try:
                lines = keys_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise TenantError(f"cannot read {keys_file}: {exc}") from None
            entries = 0
            for number, line in enumerate(lines, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                entries += 1
                where = f"{keys_file}:{number}"
                parts = text.split()
                if len(parts) != 2:
                    raise TenantError(f"{where}: expected `KEY TENANT`")
                key, tenant = parts
                check_api_key(key, where)
                check_tenant(tenant, where)
                digest = api_key_digest(key)
                if table.get(digest, tenant) != tenant:
                    raise TenantError(f"{where}: this key is given to two tenants")
                table[digest] = tenant
            if not entries:
                # An empty file must not open the API (it was given to require keys).
                raise TenantError(f"{keys_file} holds no API keys (`KEY TENANT` per line)")
        return cls(table)

    def tenant_of(self, authorization: str | None) -> str:
        """The tenant of a request's ``Authorization`` header; TenantError when keys are
        required and it is missing or wrong.

        A lookup of the presented key's digest (O(1) with thousands of keys): the table is keyed
        by one-way digests, so the time a lookup takes can tell a prober at most something about
        the digest of what it sent, never about a stored key."""
        if not self.required:
            return ANONYMOUS
        if not authorization:
            raise TenantError("You didn't provide an API key (Authorization: Bearer KEY).")
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise TenantError("Malformed Authorization header: expected `Bearer KEY`.")
        found = self.by_digest.get(api_key_digest(presented.strip()))
        if found is None:
            raise TenantError("Incorrect API key provided.")
        return found


def tenant_namespace(tenants_key: bytes, tenant: str, cache_salt: str) -> str:
    """The cache salt a request's blocks are keyed under (see the module docstring): for the
    anonymous tenant (no keys configured) nothing, or ``~`` and the client's salt; else 32 hex
    digits of ``HMAC(tenants_key, tenant)``, then ``/`` and the client's salt when it gave one.

    The ``~`` keeps the two apart where a gateway without keys shares workers with one that has
    them: a client of the first cannot name a tenant's namespace as its ``cache_salt``."""
    if tenant == ANONYMOUS:
        return f"~{cache_salt}" if cache_salt else ""
    namespace = hmac.new(tenants_key, tenant.encode(), hashlib.sha256).hexdigest()[:32]
    return f"{namespace}/{cache_salt}" if cache_salt else namespace
