"""Metadata in Redis or Valkey: several hosts share one store (docs/design/kvstore.md §10.5).

With the cluster key, member records and stream messages are sealed with a MAC bound to where
they are stored (:mod:`strata_common.records`, docs/design/security.md §5.2): a member record to
its member id, a message to the stream. A member record that fails is skipped and logged once per
member and reason; a message that fails is skipped (the cursor moves past it) and logged at most
once a minute per reason, with a count.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from kvstore.metadata.base import (
    DEFAULT_PREFIX,
    MAX_MEMBER_INFO_CHARS,
    STREAM_MAXLEN,
    member_info,
)
from strata_common.ratelog import RateLimitedLog
from strata_common.records import RecordError, RecordSeal, SkippedRecords

__all__ = ["RedisMetadataStore"]


logger = logging.getLogger(__name__)


class RedisMetadataStore:
    """Metadata in Redis or Valkey (redis-py, synchronous; safe to share between threads).

    ``cluster_key``: seal what is written and check what is read (None: no MACs).
    ``log_clock``: the clock of the once-a-minute log of skipped messages (for tests)."""

    def __init__(
        self,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        maxlen: int = STREAM_MAXLEN,
        *,
        cluster_key: bytes | None = None,
        log_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import redis  # imported here: a standalone node never needs it

        self._redis = redis.Redis.from_url(url, socket_timeout=10.0, socket_connect_timeout=5.0)
        self._prefix = prefix
        self._maxlen = maxlen
        self._members_key = f"{prefix}:members"
        self._stream = f"{prefix}:events"
        self._reap_script = self._redis.register_script(_REAP_SCRIPT)
        self._seal = RecordSeal(cluster_key)
        self._lock = threading.Lock()  # the two logs below
        self._skipped = SkippedRecords(logger, "member record")
        self._bad_messages = RateLimitedLog(logger, interval_s=60.0, clock=log_clock)
        self.messages_skipped = 0
        """Stream messages skipped because their MAC failed (since this store was opened)."""

    def _hb(self, node_id: str) -> str:
        return f"{self._prefix}:hb:{node_id}"

    def _resync_key(self, node_id: str) -> str:
        return f"{self._prefix}:resync:{node_id}"

    def ping(self) -> bool:
        return bool(self._redis.ping())

    def _member_record(self, node_id: str, info: Mapping[str, Any]) -> bytes:
        """What is stored for ``node_id``: deterministic, so a reap can name it exactly."""
        body = json.dumps(dict(info), sort_keys=True)
        return self._seal.seal((self._members_key, node_id), body)

    def register(self, node_id: str, info: Mapping[str, Any]) -> None:
        self._redis.hset(self._members_key, node_id, self._member_record(node_id, info))

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
        """Every registered member whose record is valid (:func:`member_info`); a bad one is
        skipped and logged once per reason (anyone with access to Redis may have written it)."""
        raw: Any = self._redis.hgetall(self._members_key)
        members: dict[str, dict[str, Any]] = {}
        skipped: list[bytes] = []
        with self._lock:
            for key, value in raw.items():
                try:  # RecordError and UnicodeDecodeError are ValueErrors
                    body = self._seal.open(
                        (self._members_key, key), value, max_body_bytes=MAX_MEMBER_INFO_CHARS
                    )
                    members[key.decode()] = member_info(body)
                except ValueError as exc:
                    self._skipped.note(key, str(exc))
                    skipped.append(key)
            self._skipped.forget_except(skipped)
        return members

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
        args: list[bytes | str | int] = [node_id, self._member_record(node_id, info)]
        args += [self._maxlen, *(self._sealed_message(m) for m in messages)]
        return bool(self._reap_script(keys=keys, args=args))

    def publish(self, messages: Sequence[bytes]) -> None:
        if not messages:
            return
        pipe = self._redis.pipeline(transaction=False)
        for message in messages:
            sealed = self._sealed_message(message)
            pipe.xadd(self._stream, {b"m": sealed}, maxlen=self._maxlen, approximate=True)
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
                    opened = self._opened_message(cursor, bytes(message))
                    if opened is not None:
                        messages.append(opened)
        return cursor, messages

    def _sealed_message(self, message: bytes) -> bytes:
        return self._seal.seal((self._stream,), message)

    def _opened_message(self, entry_id: str, message: bytes) -> bytes | None:
        """The message's body, or None (logged, counted) if its MAC fails."""
        try:
            return self._seal.open((self._stream,), message)
        except RecordError as exc:
            with self._lock:
                self.messages_skipped += 1
                self._bad_messages.log(
                    logging.WARNING,
                    str(exc),
                    "skipping the stream message %s of %s: %s",
                    entry_id,
                    self._stream,
                    exc,
                )
            return None

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
