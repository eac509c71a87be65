"""Metadata store: membership, heartbeats and the KV event stream (docs/design/kvstore.md §14.1).

:class:`MetadataStore` is one small synchronous interface; :class:`EmbeddedMetadataStore` keeps
everything in this process (one host, tests), :class:`RedisMetadataStore` in Redis/Valkey. Store
nodes call it from threads of their own, never from their event loop. Messages on the stream are
opaque bytes: encoded events or snapshots (:mod:`kvstore.events`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol, runtime_checkable

__all__ = [
    "DEFAULT_PREFIX",
    "START",
    "EmbeddedMetadataStore",
    "MetadataStore",
    "RedisMetadataStore",
    "open_metadata_store",
]

DEFAULT_PREFIX: Final = "strata:kv"
START: Final = "0-0"
"""Cursor of the beginning of the stream (everything still retained)."""
STREAM_MAXLEN: Final = 100_000


@runtime_checkable
class MetadataStore(Protocol):
    """Where nodes register, heartbeat and publish; where cluster views read."""

    def register(self, node_id: str, info: Mapping[str, Any]) -> None:
        """Record ``node_id``'s info (endpoint, ...), replacing an older registration."""

    def deregister(self, node_id: str) -> None:
        """Remove ``node_id``'s registration and heartbeat (graceful leave)."""

    def heartbeat(self, node_id: str, ttl_s: float) -> None:
        """Mark ``node_id`` alive for the next ``ttl_s`` seconds."""

    def members(self) -> dict[str, dict[str, Any]]:
        """Every registered node (alive or not) and its info."""

    def alive(self, node_ids: Iterable[str]) -> set[str]:
        """The subset of ``node_ids`` whose heartbeat has not expired."""

    def request_resync(self, node_id: str) -> None:
        """Ask ``node_id`` to publish a snapshot."""

    def take_resync_request(self, node_id: str) -> bool:
        """True (once) if a snapshot of ``node_id`` was requested since the last call."""

    def publish(self, messages: Sequence[bytes]) -> None:
        """Append ``messages`` to the stream, in order."""

    def read(self, cursor: str, block_s: float, count: int = 1024) -> tuple[str, list[bytes]]:
        """Messages after ``cursor`` (waiting up to ``block_s`` for one) and the new cursor."""

    def close(self) -> None:
        """Release connections."""


class EmbeddedMetadataStore:
    """In-process metadata store; thread-safe; ``clock`` is injectable for tests."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, maxlen: int = STREAM_MAXLEN
    ) -> None:
        self._clock = clock
        self._maxlen = maxlen
        self._cond = threading.Condition()
        self._members: dict[str, dict[str, Any]] = {}
        self._expires: dict[str, float] = {}
        self._resync: set[str] = set()
        self._messages: list[bytes] = []
        self._base = 0  # stream index of _messages[0] (earlier ones were trimmed)

    def register(self, node_id: str, info: Mapping[str, Any]) -> None:
        with self._cond:
            self._members[node_id] = json.loads(json.dumps(dict(info)))

    def deregister(self, node_id: str) -> None:
        with self._cond:
            self._members.pop(node_id, None)
            self._expires.pop(node_id, None)
            self._resync.discard(node_id)

    def heartbeat(self, node_id: str, ttl_s: float) -> None:
        with self._cond:
            self._expires[node_id] = self._clock() + ttl_s

    def members(self) -> dict[str, dict[str, Any]]:
        with self._cond:
            return {node: dict(info) for node, info in self._members.items()}

    def alive(self, node_ids: Iterable[str]) -> set[str]:
        with self._cond:
            now = self._clock()
            return {n for n in node_ids if self._expires.get(n, float("-inf")) > now}

    def request_resync(self, node_id: str) -> None:
        with self._cond:
            self._resync.add(node_id)

    def take_resync_request(self, node_id: str) -> bool:
        with self._cond:
            if node_id in self._resync:
                self._resync.discard(node_id)
                return True
            return False

    def publish(self, messages: Sequence[bytes]) -> None:
        with self._cond:
            self._messages.extend(bytes(m) for m in messages)
            excess = len(self._messages) - self._maxlen
            if excess > 0:
                del self._messages[:excess]
                self._base += excess
            self._cond.notify_all()

    def read(self, cursor: str, block_s: float, count: int = 1024) -> tuple[str, list[bytes]]:
        position = 0 if cursor == START else int(cursor)
        deadline = time.monotonic() + block_s
        with self._cond:
            while self._base + len(self._messages) <= position:
                left = deadline - time.monotonic()
                if left <= 0:
                    return cursor, []
                self._cond.wait(left)
            start = max(position - self._base, 0)
            batch = self._messages[start : start + count]
            return str(self._base + start + len(batch)), batch

    def close(self) -> None:
        pass


class RedisMetadataStore:
    """Metadata in Redis or Valkey (redis-py, synchronous; safe to share between threads)."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, maxlen: int = STREAM_MAXLEN) -> None:
        import redis  # imported here: a standalone node never needs it

        self._redis = redis.Redis.from_url(url, socket_timeout=10.0, socket_connect_timeout=5.0)
        self._prefix = prefix
        self._maxlen = maxlen
        self._members_key = f"{prefix}:members"
        self._stream = f"{prefix}:events"

    def _hb(self, node_id: str) -> str:
        return f"{self._prefix}:hb:{node_id}"

    def _resync_key(self, node_id: str) -> str:
        return f"{self._prefix}:resync:{node_id}"

    def ping(self) -> bool:
        return bool(self._redis.ping())

    def register(self, node_id: str, info: Mapping[str, Any]) -> None:
        self._redis.hset(self._members_key, node_id, json.dumps(dict(info), sort_keys=True))

    def deregister(self, node_id: str) -> None:
        pipe = self._redis.pipeline()
        pipe.hdel(self._members_key, node_id)
        pipe.delete(self._hb(node_id), self._resync_key(node_id))
        pipe.execute()

    def heartbeat(self, node_id: str, ttl_s: float) -> None:
        self._redis.set(self._hb(node_id), b"1", px=max(1, int(ttl_s * 1000)))

    def members(self) -> dict[str, dict[str, Any]]:
        raw: Any = self._redis.hgetall(self._members_key)
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def alive(self, node_ids: Iterable[str]) -> set[str]:
        nodes = list(node_ids)
        if not nodes:
            return set()
        present: Any = self._redis.mget([self._hb(n) for n in nodes])
        return {n for n, value in zip(nodes, present, strict=True) if value is not None}

    def request_resync(self, node_id: str) -> None:
        self._redis.set(self._resync_key(node_id), b"1")

    def take_resync_request(self, node_id: str) -> bool:
        return self._redis.getdel(self._resync_key(node_id)) is not None

    def publish(self, messages: Sequence[bytes]) -> None:
        if not messages:
            return
        pipe = self._redis.pipeline(transaction=False)
        for message in messages:
            pipe.xadd(self._stream, {b"m": message}, maxlen=self._maxlen, approximate=True)
        pipe.execute()

    def read(self, cursor: str, block_s: float, count: int = 1024) -> tuple[str, list[bytes]]:
        block_ms = max(1, int(block_s * 1000))
        reply: Any = self._redis.xread({self._stream: cursor}, count=count, block=block_ms)
        messages: list[bytes] = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                cursor = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                message = fields.get(b"m")
                if message is not None:
                    messages.append(bytes(message))
        return cursor, messages

    def close(self) -> None:
        self._redis.close()


_EMBEDDED: dict[str, EmbeddedMetadataStore] = {}
_EMBEDDED_LOCK = threading.Lock()


def open_metadata_store(spec: str) -> MetadataStore:
    """``"embedded"`` (this process's shared embedded store) or a ``redis://`` URL."""
    if spec == "embedded":
        with _EMBEDDED_LOCK:
            return _EMBEDDED.setdefault(spec, EmbeddedMetadataStore())
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisMetadataStore(spec)
    raise ValueError(f"metadata must be 'embedded' or a redis:// URL, got {spec!r}")
