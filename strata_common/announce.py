"""Worker announcements in the shared Redis: the one contract between a worker that registers
itself and the gateways that serve it (docs/design/multihost.md §3).

A worker started outside a gateway's launcher (another host, a Kubernetes pod) announces itself:

    key   = b"strata:registry:announce:" + ENDPOINT          (its advertised HOST:PORT)
    value = seal((key,), {"boot", "endpoint", "model", "role"} as JSON)   SET ... EX ttl

sealed with :class:`~strata_common.records.RecordSeal` like every record Strata keeps in Redis
(docs/design/security.md §5.2: a MAC under the cluster key over the Redis key and the body), so an
announcement cannot be forged without the key, altered, or moved under another endpoint's key.
The worker writes it once its gRPC server is ready and again every interval; Redis expires it
``ttl`` after the last write (no host's clock is compared with another's), and the worker deletes
it when it stops (only if it is still its own: ``boot`` tells one process's announcement from
its successor's at the same endpoint). Every gateway reads all of them each health-check round.

- ``endpoint``: canonical ``HOST:PORT`` (:func:`~strata_common.endpoints.format_endpoint` of
  its parse), the same as in the key; never a wildcard address (nobody can dial ``0.0.0.0``).
- ``role``: ``prefill``, ``decode`` or ``both`` (the worker's ``--role``).
- ``model``: what the worker serves (its Health's ``model``), for the operator's eyes; the
  gateway checks the worker itself over gRPC before it sends it anything.
- ``boot``: this worker process's id, random per start.

A stored value over :data:`MAX_ANNOUNCEMENT_BYTES` is not parsed. A bad announcement (size, MAC,
JSON, a field, an endpoint other than its key's) is skipped and logged once per key and reason
(:class:`~strata_common.records.SkippedRecords`); the good ones are read, every round.

The ``redis`` package (redis.asyncio) is imported only where a connection is opened.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from strata_common.endpoints import EndpointError, is_wildcard, parse_endpoint
from strata_common.records import RecordError, RecordSeal, SkippedRecords
from strata_common.secrets import redact_url

__all__ = [
    "MAX_ANNOUNCEMENT_BYTES",
    "AnnouncedRole",
    "Announcement",
    "AnnouncementError",
    "AnnouncementReader",
    "AnnouncementStoreError",
    "Announcer",
    "announcement_key",
    "announcement_prefix",
    "new_boot_id",
    "open_announcement",
    "seal_announcement",
]

logger = logging.getLogger(__name__)

MAX_ANNOUNCEMENT_BYTES: Final = 4096
"""The largest stored announcement (sealed) that is parsed; one is ~200 bytes."""
MAX_MODEL_CHARS: Final = 1024
_BOOT = re.compile(r"[A-Za-z0-9._-]{1,64}")
SCAN_COUNT: Final = 256
"""Keys one SCAN step looks at (a hint to Redis); each step's matches are read with one MGET."""

# Reasons a stored announcement is skipped: fixed texts (the log keyed by them stays small).
TOO_LARGE: Final = f"larger than {MAX_ANNOUNCEMENT_BYTES} bytes"
NOT_JSON: Final = "not a JSON object"
BAD_ENDPOINT: Final = "endpoint is not a canonical HOST:PORT"
WILDCARD: Final = "endpoint is a wildcard address (nobody can dial it)"
OTHER_KEY: Final = "endpoint differs from the one its key names"
BAD_ROLE: Final = "role is not prefill, decode or both"
BAD_MODEL: Final = f"model is not a string of at most {MAX_MODEL_CHARS} characters"
BAD_BOOT: Final = "boot is not 1..64 characters of [A-Za-z0-9._-]"


class AnnouncementError(ValueError):
    """A stored announcement is unusable; ``str()`` is one of a few fixed reasons."""


class AnnouncementStoreError(RuntimeError):
    """Redis could not be read or written (down, refused, timed out)."""


class AnnouncedRole(enum.Enum):
    """The role a worker announces: its ``--role``."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class Announcement:
    """One worker's announcement (see the module docstring for the fields)."""

    endpoint: str
    role: AnnouncedRole
    model: str
    boot: str

    def __post_init__(self) -> None:
        """Checks a locally made announcement (a worker's): ValueError says what is wrong."""
        _check_endpoint(self.endpoint)
        if len(self.model) > MAX_MODEL_CHARS:
            raise ValueError(BAD_MODEL)
        if not _BOOT.fullmatch(self.boot):
            raise ValueError(BAD_BOOT)

    def to_json(self) -> str:
        return json.dumps(
            {
                "boot": self.boot,
                "endpoint": self.endpoint,
                "model": self.model,
                "role": self.role.value,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, body: bytes) -> Announcement:
        """The announcement in ``body``, every field validated; AnnouncementError otherwise."""
        try:
            data = json.loads(body)
        except (ValueError, TypeError, RecursionError):  # deep nesting: RecursionError
            raise AnnouncementError(NOT_JSON) from None
        if not isinstance(data, dict):
            raise AnnouncementError(NOT_JSON)
        endpoint, role, model, boot = (data.get(k) for k in ("endpoint", "role", "model", "boot"))
        if not isinstance(endpoint, str):
            raise AnnouncementError(BAD_ENDPOINT)
        _check_endpoint(endpoint)
        if not isinstance(role, str) or role not in _ROLES:
            raise AnnouncementError(BAD_ROLE)
        if not isinstance(model, str) or len(model) > MAX_MODEL_CHARS:
            raise AnnouncementError(BAD_MODEL)
        if not isinstance(boot, str) or not _BOOT.fullmatch(boot):
            raise AnnouncementError(BAD_BOOT)
        return cls(endpoint, _ROLES[role], model, boot)


_ROLES: Final = {role.value: role for role in AnnouncedRole}


def _check_endpoint(endpoint: str) -> None:
    """AnnouncementError unless ``endpoint`` is a canonical ``HOST:PORT`` others can dial."""
    try:
        parsed = parse_endpoint(endpoint)
    except EndpointError:
        raise AnnouncementError(BAD_ENDPOINT) from None
    if str(parsed) != endpoint:
        raise AnnouncementError(BAD_ENDPOINT)
    if is_wildcard(parsed.host):
        raise AnnouncementError(WILDCARD)


def new_boot_id() -> str:
    """A fresh ``boot``: random, one per worker process start."""
    return secrets.token_hex(8)


def announcement_prefix(namespace: str = "strata") -> str:
    """The keys of every announcement start with this."""
    return f"{namespace}:registry:announce:"


def announcement_key(endpoint: str, namespace: str = "strata") -> str:
    """The Redis key of ``endpoint``'s announcement."""
    return announcement_prefix(namespace) + endpoint


def seal_announcement(seal: RecordSeal, announcement: Announcement, namespace: str) -> bytes:
    """What to store under ``announcement_key(announcement.endpoint, namespace)``."""
    key = announcement_key(announcement.endpoint, namespace)
    stored = seal.seal((key,), announcement.to_json())
    if len(stored) > MAX_ANNOUNCEMENT_BYTES:
        raise ValueError(f"announcement of {len(stored)} bytes: {TOO_LARGE}")
    return stored


def open_announcement(
    seal: RecordSeal, key: bytes | str, stored: bytes, namespace: str = "strata"
) -> Announcement:
    """The announcement stored under ``key``: size, MAC (bound to ``key``), JSON and fields
    checked, and its endpoint the one ``key`` names. AnnouncementError (or RecordError, for the
    MAC) says why not."""
    if len(stored) > MAX_ANNOUNCEMENT_BYTES:
        raise AnnouncementError(TOO_LARGE)
    raw_key = key.encode() if isinstance(key, str) else key
    body = seal.open((raw_key,), stored)
    announcement = Announcement.from_json(body)
    if announcement_key(announcement.endpoint, namespace).encode() != raw_key:
        raise AnnouncementError(OTHER_KEY)
    return announcement


def _client(url: str) -> Any:
    import redis.asyncio as aioredis  # only announcing workers and Redis-backed gateways need it

    return aioredis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)


# KEYS: the announcement. ARGV: the value this process stored. Deleted only if it is still that
# value: a successor at the same endpoint (another boot) keeps its announcement.
_WITHDRAW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Announcer:
    """A worker's announcement in Redis: :meth:`publish` (write, or refresh: the same bytes with
    a fresh expiry, recreated if Redis lost it) and :meth:`withdraw` (delete it if it is still
    this process's). Every method raises AnnouncementStoreError when Redis cannot be reached.

    ``cluster_key``: seal with it (the gateways must have the same key), or None for no MAC
    (gateways without a key: loopback development)."""

    def __init__(
        self,
        url: str,
        announcement: Announcement,
        *,
        cluster_key: bytes | None,
        ttl_s: float,
        namespace: str = "strata",
    ) -> None:
        if not ttl_s >= 1.0:
            raise ValueError(f"an announcement's TTL is at least 1 s, got {ttl_s}")
        self.announcement = announcement
        self.key = announcement_key(announcement.endpoint, namespace)
        self._value = seal_announcement(RecordSeal(cluster_key), announcement, namespace)
        self._ttl_ms = int(ttl_s * 1000)
        self._url = url
        self._redis: Any = _client(url)
        self._withdraw = self._redis.register_script(_WITHDRAW_LUA)

    @property
    def description(self) -> str:
        return redact_url(self._url)

    async def publish(self) -> None:
        """SET the announcement with its TTL (PX: the TTL in milliseconds)."""
        try:
            await self._redis.set(self.key, self._value, px=self._ttl_ms)
        except Exception as exc:  # redis.RedisError, OSError
            raise AnnouncementStoreError(f"announce to {self.description}: {exc}") from exc

    async def withdraw(self) -> bool:
        """Delete the announcement if it is still this one; True if it was deleted."""
        try:
            return bool(await self._withdraw(keys=[self.key], args=[self._value]))
        except Exception as exc:
            raise AnnouncementStoreError(f"withdraw from {self.description}: {exc}") from exc

    async def close(self) -> None:
        await self._redis.aclose()


class AnnouncementReader:
    """Reads every valid announcement (a gateway, each health-check round).

    ``redis``: a redis.asyncio client (the registry store's own); ``seal``: the registry's
    (the same cluster key, or none)."""

    def __init__(self, redis: Any, seal: RecordSeal, *, namespace: str = "strata") -> None:
        self._redis = redis
        self._seal = seal
        self._namespace = namespace
        self._match = _glob_escape(announcement_prefix(namespace)) + "*"
        self._skipped = SkippedRecords(logger, "worker announcement")

    async def read(self) -> dict[str, Announcement]:
        """The valid announcements by endpoint (SCAN MATCH … COUNT, one MGET per step). A key
        that expires between the SCAN and its MGET is simply absent. AnnouncementStoreError
        when Redis cannot be read."""
        announcements: dict[str, Announcement] = {}
        skipped: list[bytes] = []
        try:
            cursor: Any = 0
            while True:
                cursor, keys = await self._redis.scan(cursor, match=self._match, count=SCAN_COUNT)
                if keys:
                    values = await self._redis.mget(keys)
                    self._open_all(dict(zip(keys, values, strict=True)), announcements, skipped)
                if not cursor:
                    break
        except Exception as exc:
            raise AnnouncementStoreError(f"read announcements: {exc}") from exc
        self._skipped.forget_except(skipped)
        return announcements

    def _open_all(
        self,
        stored: Mapping[bytes, bytes | None],
        into: dict[str, Announcement],
        skipped: list[bytes],
    ) -> None:
        for key, value in stored.items():
            if value is None:
                continue  # expired or deleted since the SCAN
            try:
                announcement = open_announcement(self._seal, key, value, self._namespace)
            except (AnnouncementError, RecordError) as exc:
                self._skipped.note(key, str(exc))
                skipped.append(key)
                continue
            into[announcement.endpoint] = announcement

    @property
    def skipped(self) -> dict[bytes, str]:
        """The announcements skipped in the last read, by key: why."""
        return self._skipped.skipped


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
