"""Metadata store: membership, heartbeats and the KV event stream (docs/design/kvstore.md §14.1).

:class:`MetadataStore` is one small synchronous interface; :class:`EmbeddedMetadataStore` keeps
everything in this process (one host, tests), :class:`RedisMetadataStore` in Redis/Valkey. Store
nodes call it from threads of their own, never from their event loop. Messages on the stream are
opaque bytes: encoded events or snapshots (:mod:`kvstore.events`).
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_PREFIX",
    "KIND_KEY",
    "START",
    "STRATA_SCHEME",
    "EmbeddedMetadataStore",
    "MemberKind",
    "MetadataSpec",
    "MetadataStore",
    "RedisMetadataStore",
    "member_kind",
    "open_metadata_store",
    "parse_metadata_spec",
]

DEFAULT_PREFIX: Final = "strata:kv"
START: Final = "0-0"
"""Cursor of the beginning of the stream (everything still retained)."""
STREAM_MAXLEN: Final = 100_000
STRATA_SCHEME: Final = "strata://"
"""``strata://HOST:PORT``: the metadata a store node serves (docs/design/kvstore.md §14.6)."""
KIND_KEY: Final = "kind"
"""The member-info field naming what a member is (:class:`MemberKind`)."""


class MemberKind(enum.StrEnum):
    """What a registered member is (docs/design/kvstore.md §14.1).

    Both kinds heartbeat, publish KV events under their id and are reaped the same way when
    their heartbeat expires; only store nodes serve blocks, so only they are read-through peers
    or migration targets.
    """

    STORE = "store"
    """A store node: serves blocks over the wire (DRAM/SSD)."""
    ENGINE = "engine"
    """An engine's worker: publishes the blocks resident in its engine (HBM); serves none."""


def member_kind(info: Mapping[str, Any]) -> MemberKind | None:
    """The kind recorded in a member's info; none recorded means a store node (members
    registered before kinds existed). An unknown kind (a newer peer's) is None: neither."""
    kind = info.get(KIND_KEY, MemberKind.STORE.value)
    try:
        return MemberKind(kind)
    except ValueError:
        return None


@runtime_checkable
class MetadataStore(Protocol):
    """Where nodes register, heartbeat and publish; where cluster views read."""

    def register(self, node_id: str, info: Mapping[str, Any]) -> None:
        """Record ``node_id``'s info (endpoint, ...), replacing an older registration."""

    def deregister(self, node_id: str) -> None:
        """Remove ``node_id``'s registration and heartbeat (graceful leave)."""

    def heartbeat(self, node_id: str, ttl_s: float) -> bool:
        """Mark ``node_id`` alive for the next ``ttl_s`` seconds; True if it is registered
        (False: it was never registered, or a sweep reaped it -- it should register again)."""

    def members(self) -> dict[str, dict[str, Any]]:
        """Every registered node (alive or not) and its info."""

    def alive(self, node_ids: Iterable[str]) -> set[str]:
        """The subset of ``node_ids`` whose heartbeat has not expired."""

    def request_resync(self, node_id: str) -> None:
        """Ask ``node_id`` to publish a snapshot."""

    def take_resync_request(self, node_id: str) -> bool:
        """True (once) if a snapshot of ``node_id`` was requested since the last call."""

    def reap(self, node_id: str, info: Mapping[str, Any], messages: Sequence[bytes]) -> bool:
        """Remove a dead member, atomically: only if ``node_id`` is still registered with exactly
        ``info`` (the incarnation the caller saw) and its heartbeat has expired; then append
        ``messages`` (its final ``SourceCleared``) to the stream. True if this call removed it.

        A node registers only after its first heartbeat, so a sweep working from a stale
        member list can never remove a restarted node, and the messages land in the stream
        before anything the new incarnation publishes."""

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
        self._listeners: list[Callable[[], None]] = []

    def register(self, node_id: str, info: Mapping[str, Any]) -> None:
        with self._cond:
            self._members[node_id] = json.loads(json.dumps(dict(info)))

    def deregister(self, node_id: str) -> None:
        with self._cond:
            self._members.pop(node_id, None)
            self._expires.pop(node_id, None)
            self._resync.discard(node_id)

    def heartbeat(self, node_id: str, ttl_s: float) -> bool:
        with self._cond:
            self._expires[node_id] = self._clock() + ttl_s
            return node_id in self._members

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

    def reap(self, node_id: str, info: Mapping[str, Any], messages: Sequence[bytes]) -> bool:
        with self._cond:
            current = self._members.get(node_id)
            if current is None or current != json.loads(json.dumps(dict(info))):
                return False
            if self._expires.get(node_id, float("-inf")) > self._clock():
                return False
            del self._members[node_id]
            self._expires.pop(node_id, None)
            self._resync.discard(node_id)
            self._append_locked(messages)
        self._notify_listeners()
        return True

    def publish(self, messages: Sequence[bytes]) -> None:
        with self._cond:
            self._append_locked(messages)
        self._notify_listeners()

    def add_publish_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the publishing thread, no lock held) after every append;
        a node serving this store over the wire wakes its long-polling readers with it."""
        with self._cond:
            self._listeners.append(callback)

    def remove_publish_listener(self, callback: Callable[[], None]) -> None:
        with self._cond:
            self._listeners = [c for c in self._listeners if c is not callback]

    def _append_locked(self, messages: Sequence[bytes]) -> None:
        self._messages.extend(bytes(m) for m in messages)
        excess = len(self._messages) - self._maxlen
        if excess > 0:
            del self._messages[:excess]
            self._base += excess
        self._cond.notify_all()

    def _notify_listeners(self) -> None:
        with self._cond:
            listeners = list(self._listeners)
        for callback in listeners:
            callback()

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
        self._reap_script = self._redis.register_script(_REAP_SCRIPT)

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

    def heartbeat(self, node_id: str, ttl_s: float) -> bool:
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._hb(node_id), b"1", px=max(1, int(ttl_s * 1000)))
        pipe.hexists(self._members_key, node_id)
        _ok, registered = pipe.execute()
        return bool(registered)

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

    def reap(self, node_id: str, info: Mapping[str, Any], messages: Sequence[bytes]) -> bool:
        keys = [self._members_key, self._hb(node_id), self._resync_key(node_id), self._stream]
        args: list[bytes | str | int] = [node_id, json.dumps(dict(info), sort_keys=True)]
        args += [self._maxlen, *messages]
        return bool(self._reap_script(keys=keys, args=args))

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


_REAP_SCRIPT: Final = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
for i = 4, #ARGV do
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'm', ARGV[i])
end
return 1
"""
"""Atomic :meth:`MetadataStore.reap`: same registration (exact JSON), no heartbeat, then remove
and publish. A Lua script runs with no other command in between."""

_EMBEDDED: dict[str, EmbeddedMetadataStore] = {}
_EMBEDDED_LOCK = threading.Lock()


_SPEC_FORMS: Final = (
    "'embedded', redis://HOST[:PORT][/DB], rediss://..., unix:///PATH or strata://HOST:PORT"
)
_REDIS_SCHEMES: Final = frozenset({"redis", "rediss", "unix"})


@dataclass(frozen=True, slots=True)
class MetadataSpec:
    """A validated metadata-store spec (:func:`parse_metadata_spec`)."""

    spec: str
    """As given."""
    scheme: str
    """``"embedded"``, ``"redis"``, ``"rediss"``, ``"unix"`` or ``"strata"``."""
    host: str | None = None
    """The host (IPv6 without brackets); None for ``embedded`` and ``unix``."""
    port: int | None = None
    """The port; None where the scheme has a default (Redis: 6379) or none."""

    @property
    def shared(self) -> bool:
        """Other processes can reach it (everything but ``embedded``)."""
        return self.scheme != "embedded"

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` of a ``strata://`` spec (what :class:`RemoteMetadataStore` dials)."""
        if self.scheme != "strata":
            raise ValueError(f"{self.spec!r} is not a strata:// spec")
        return f"{self.host}:{self.port}"


def parse_metadata_spec(spec: str) -> MetadataSpec:
    """Parse and validate a metadata-store spec without connecting anywhere.

    The one check behind every ``--metadata`` / ``--kv-metadata`` option and
    :func:`open_metadata_store`: a malformed spec fails here, with a ValueError that says what is
    wrong (unknown scheme, missing host or port, a port that is not 1..65535, a Redis database
    that is not a number, anything after ``strata://HOST:PORT``), not later as a traceback from a
    socket or a URL parser.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"metadata spec is empty; expected {_SPEC_FORMS}")
    if any(c.isspace() for c in spec):
        raise ValueError(f"metadata spec {spec!r} contains whitespace")
    if spec == "embedded":
        return MetadataSpec(spec, "embedded")
    scheme, sep, _rest = spec.partition("://")
    if not sep:
        raise ValueError(f"metadata spec {spec!r} has no scheme; expected {_SPEC_FORMS}")
    scheme = scheme.lower()
    if scheme not in _REDIS_SCHEMES and scheme != "strata":
        raise ValueError(
            f"unknown metadata scheme {scheme + '://'!r} in {spec!r}; expected {_SPEC_FORMS}"
        )
    parts = urlsplit(spec)
    if scheme == "unix":
        if not parts.path or parts.path == "/":
            raise ValueError(f"metadata spec {spec!r} names no socket path (unix:///PATH)")
        return MetadataSpec(spec, scheme)
    netloc = parts.netloc.rpartition("@")[2]
    if scheme == "strata" and "@" in parts.netloc:
        raise ValueError(f"metadata spec {spec!r}: strata://HOST:PORT takes no user or password")
    host, port_text = _split_host_port(netloc)
    if not host:
        raise ValueError(f"metadata spec {spec!r} has no host")
    port: int | None = None
    if port_text is None or port_text == "":
        if scheme == "strata":
            raise ValueError(f"metadata spec {spec!r} has no port (strata://HOST:PORT)")
    else:
        if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"metadata spec {spec!r} has a bad port {port_text!r} (1..65535)")
        port = int(port_text)
    if scheme == "strata":
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"metadata spec {spec!r}: nothing may follow strata://HOST:PORT")
    else:
        database = parts.path.removeprefix("/")
        if database and not (database.isascii() and database.isdigit()):
            raise ValueError(f"metadata spec {spec!r} has a bad database {database!r} (a number)")
    return MetadataSpec(spec, scheme, host, port)


def _split_host_port(netloc: str) -> tuple[str, str | None]:
    """``host[:port]`` or ``[v6]:port`` -> (host without brackets, port text or None)."""
    if netloc.startswith("["):
        host, bracket, rest = netloc[1:].partition("]")
        if not bracket:
            return "", None
        if not rest:
            return host, None
        if not rest.startswith(":"):
            return "", None
        return host, rest[1:]
    host, colon, port = netloc.rpartition(":")
    if not colon:
        return netloc, None
    return host, port


def open_metadata_store(spec: str) -> MetadataStore:
    """``"embedded"`` (this process's shared embedded store), a ``redis://`` URL, or
    ``strata://HOST:PORT``: the embedded store of the store node at HOST:PORT, over its wire
    protocol (:mod:`kvstore.metadata_service`) -- one host, no Redis. A malformed spec raises
    the ValueError of :func:`parse_metadata_spec`."""
    parsed = parse_metadata_spec(spec)
    if parsed.scheme == "embedded":
        with _EMBEDDED_LOCK:
            return _EMBEDDED.setdefault(spec, EmbeddedMetadataStore())
    if parsed.scheme == "strata":
        from kvstore.metadata_service import RemoteMetadataStore  # it imports this module

        return RemoteMetadataStore(parsed.endpoint)
    return RedisMetadataStore(spec)
