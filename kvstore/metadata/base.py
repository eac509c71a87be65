"""The metadata-store contract: members, heartbeats, resync requests, the atomic reap, the KV event
stream (docs/design/kvstore.md §10.5), and the spec that names a store.

:class:`MetadataStore` is one small synchronous interface with three backends:
:class:`~kvstore.metadata.embedded.EmbeddedMetadataStore` (in this process: one host, tests),
:class:`~kvstore.metadata.redis.RedisMetadataStore` (Redis/Valkey: several hosts) and
:class:`~kvstore.metadata.remote.RemoteMetadataStore` (``strata://HOST:PORT``: a store node's
embedded store, served over gRPC by :mod:`kvstore.metadata.service`). Store nodes call it from
threads of their own, never from their event loop. Messages on the stream are opaque bytes:
encoded events or snapshots (:mod:`kvstore.cluster.events`).

Errors: an argument no store accepts raises ``ValueError``; a store that cannot be reached or does
not answer in time raises ``OSError`` (``ConnectionError``, ``TimeoutError``) -- Redis raises its
client's own errors -- and a store that refuses a call for another reason
:class:`MetadataServiceError`. Callers log and retry, through an :class:`OutageLog` each, so that
a store that is down for minutes costs a few log lines, not a traceback per retry.
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable
from urllib.parse import urlsplit

from strata_common.endpoints import format_endpoint
from strata_common.secrets import redact_url

__all__ = [
    "DEFAULT_PREFIX",
    "KIND_KEY",
    "MAX_BLOCK_S",
    "MAX_MESSAGE_BYTES",
    "START",
    "STRATA_SCHEME",
    "STREAM_MAXLEN",
    "STREAM_MAX_AGE_S",
    "MemberKind",
    "MetadataServiceError",
    "MetadataSpec",
    "MetadataStore",
    "OutageLog",
    "member_info",
    "member_kind",
    "parse_metadata_spec",
]

DEFAULT_PREFIX: Final = "strata:kv"
START: Final = "0-0"
"""Cursor of the beginning of the stream (everything still retained)."""
STREAM_MAXLEN: Final = 100_000
STREAM_MAX_AGE_S: Final = 300.0
"""The embedded stream keeps messages this long at most (and ``STREAM_MAXLEN`` of them): readers
follow it within a second, one behind by more misses events and resyncs (§10.2), and a node's
memory does not grow with the event rate (~72 messages/s, 7 MiB in 17 minutes under the soak)."""
STRATA_SCHEME: Final = "strata://"
"""``strata://HOST:PORT``: a store node's gRPC metadata service (docs/design/kvstore.md §10.6)."""
KIND_KEY: Final = "kind"
"""The member-info field naming what a member is (:class:`MemberKind`)."""
MAX_BLOCK_S: Final = 30.0
"""Longest a remote ``read`` waits for a message; longer requests are clamped."""
MAX_MESSAGE_BYTES: Final = 64 << 20
"""Largest request or reply of the gRPC service (a snapshot of ~4 M keys); a ``read`` reply
returns fewer messages rather than exceed it."""


class MetadataServiceError(RuntimeError):
    """A metadata store refused a call for a reason other than a bad argument or the network."""


class MemberKind(enum.StrEnum):
    """What a registered member is (docs/design/kvstore.md §10.5).

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


MAX_MEMBER_INFO_FIELDS: Final = 64
MAX_MEMBER_INFO_CHARS: Final = 4096
"""Bounds on one member's info (what members register is a handful of short fields)."""


def member_info(raw: Any) -> dict[str, Any]:
    """A member's info as read from a shared store, validated: a JSON object (or mapping) of
    at most 64 string names to JSON scalars, 4 KiB of text in all; ``endpoint`` and ``kind``,
    when present, strings. ValueError says what is wrong: a reader skips that member (logged)
    and goes on with the others, whoever wrote the record."""
    if isinstance(raw, (bytes, str)):
        if len(raw) > MAX_MEMBER_INFO_CHARS:
            raise ValueError(f"member info of {len(raw)} bytes (at most {MAX_MEMBER_INFO_CHARS})")
        try:
            raw = json.loads(raw)
        except (ValueError, TypeError, RecursionError) as exc:  # deep nesting: RecursionError
            raise ValueError(f"member info is not JSON: {exc}") from None
    if not isinstance(raw, Mapping):
        raise ValueError(f"member info is a {type(raw).__name__}, not an object")
    if len(raw) > MAX_MEMBER_INFO_FIELDS:
        raise ValueError(f"member info has {len(raw)} fields (at most {MAX_MEMBER_INFO_FIELDS})")
    info: dict[str, Any] = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            raise ValueError(f"member info name {name!r:.40} is not a string")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"member info {name!r:.40} is a {type(value).__name__}, not a scalar")
        info[name] = value
    for name in ("endpoint", KIND_KEY):
        if name in info and not isinstance(info[name], str):
            raise ValueError(f"member info {name!r} is not a string")
    return info


@runtime_checkable
class MetadataStore(Protocol):
    """Where nodes register, heartbeat and publish; where cluster views read."""

    def register(self, node_id: str, info: Mapping[str, Any]) -> None:
        """Record ``node_id``'s info (endpoint, ...), replacing an older registration.

        Info maps names to JSON scalars (str, int, float, bool, None): what every member
        registers, and what the gRPC service carries as typed values."""

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
        """``HOST:PORT`` of a ``strata://`` spec, IPv6 in brackets (the gRPC address that
        :class:`~kvstore.metadata.remote.RemoteMetadataStore` dials)."""
        if self.scheme != "strata" or self.host is None or self.port is None:
            raise ValueError(f"{redact_url(self.spec)!r} is not a strata:// spec")
        return format_endpoint(self.host, self.port)


def parse_metadata_spec(spec: str) -> MetadataSpec:
    """Parse and validate a metadata-store spec without connecting anywhere.

    The one check behind every ``--metadata`` / ``--kv-metadata`` option and
    :func:`open_metadata_store`: a malformed spec fails here, with a ValueError that says what is
    wrong (unknown scheme, missing host or port, a port that is not 1..65535, a Redis database
    that is not a number, anything after ``strata://HOST:PORT``), not later as a traceback from a
    socket or a URL parser.
    """
    shown = redact_url(spec)  # errors never show a password
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"metadata spec is empty; expected {_SPEC_FORMS}")
    if any(c.isspace() for c in spec):
        raise ValueError(f"metadata spec {shown!r} contains whitespace")
    if spec == "embedded":
        return MetadataSpec(spec, "embedded")
    scheme, sep, _rest = spec.partition("://")
    if not sep:
        raise ValueError(f"metadata spec {shown!r} has no scheme; expected {_SPEC_FORMS}")
    scheme = scheme.lower()
    if scheme not in _REDIS_SCHEMES and scheme != "strata":
        raise ValueError(
            f"unknown metadata scheme {scheme + '://'!r} in {shown!r}; expected {_SPEC_FORMS}"
        )
    parts = urlsplit(spec)
    if scheme == "unix":
        if not parts.path or parts.path == "/":
            raise ValueError(f"metadata spec {shown!r} names no socket path (unix:///PATH)")
        return MetadataSpec(spec, scheme)
    netloc = parts.netloc.rpartition("@")[2]
    if scheme == "strata" and "@" in parts.netloc:
        raise ValueError(f"metadata spec {shown!r}: strata://HOST:PORT takes no user or password")
    host, port_text = _split_host_port(netloc)
    if not host:
        raise ValueError(f"metadata spec {shown!r} has no host")
    port: int | None = None
    if port_text is None or port_text == "":
        if scheme == "strata":
            raise ValueError(f"metadata spec {shown!r} has no port (strata://HOST:PORT)")
    else:
        if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"metadata spec {shown!r} has a bad port {port_text!r} (1..65535)")
        port = int(port_text)
    if scheme == "strata":
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"metadata spec {shown!r}: nothing may follow strata://HOST:PORT")
    else:
        database = parts.path.removeprefix("/")
        if database and not (database.isascii() and database.isdigit()):
            raise ValueError(f"metadata spec {shown!r} has a bad database {database!r} (a number)")
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


class OutageLog:
    """How a retry loop logs a call that keeps failing (the metadata store is down).

    The first failure is logged with its traceback; while it keeps failing, one line every
    ``every_s`` says for how long and how many times (with the latest error); the first success
    after a failure says that it recovered. A Redis outage of ten minutes used to log a traceback
    per retry -- 20 a second from a node's view, heartbeat and publisher together (found by the
    chaos suite, tests/chaos/test_kv_redis_restart.py). One instance per loop (not thread-safe).
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self._every_s = every_s
        self._clock = clock
        self._since: float | None = None
        self._last_logged = 0.0
        self.failures = 0
        """Failures since the last success."""

    def failed(self, exc: BaseException) -> None:
        """Call from the ``except`` block of a failed attempt."""
        now = self._clock()
        self.failures += 1
        if self._since is None:
            self._since = self._last_logged = now
            self._logger.error("%s failed; retrying", self._what, exc_info=exc)
        elif now - self._last_logged >= self._every_s:
            self._last_logged = now
            self._logger.error(
                "%s still failing after %.0fs (%d attempts): %s",
                self._what,
                now - self._since,
                self.failures,
                exc,
            )

    def succeeded(self) -> None:
        """Call after a successful attempt."""
        if self._since is None:
            return
        self._logger.warning(
            "%s works again after %.1fs (%d failed attempts)",
            self._what,
            self._clock() - self._since,
            self.failures,
        )
        self._since = None
        self.failures = 0
