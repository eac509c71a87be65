"""The in-process metadata store: one host, no Redis (docs/design/kvstore.md §10.5).

A store node started with ``--metadata embedded`` keeps its cluster's metadata here and serves it
to the other processes of its host over gRPC (:mod:`kvstore.metadata.service`); tests use it
directly.
"""

from __future__ import annotations

import bisect
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kvstore.metadata.base import START, STREAM_MAX_AGE_S, STREAM_MAXLEN

__all__ = ["EmbeddedMetadataStore"]


class EmbeddedMetadataStore:
    """In-process metadata store; thread-safe; ``clock`` is injectable for tests."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        maxlen: int = STREAM_MAXLEN,
        max_age_s: float = STREAM_MAX_AGE_S,
    ) -> None:
        if maxlen < 1 or not max_age_s > 0:
            raise ValueError("need maxlen >= 1 and max_age_s > 0")
        self._clock = clock
        self._maxlen = maxlen
        self._max_age_s = max_age_s
        self._cond = threading.Condition()
        self._members: dict[str, dict[str, Any]] = {}
        self._expires: dict[str, float] = {}
        self._resync: set[str] = set()
        self._messages: list[bytes] = []
        self._appended_at: list[float] = []  # clock() of each message's append, ascending
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
        the gRPC service (:mod:`kvstore.metadata.service`) wakes its waiting readers with it."""
        with self._cond:
            self._listeners.append(callback)

    def remove_publish_listener(self, callback: Callable[[], None]) -> None:
        with self._cond:
            self._listeners = [c for c in self._listeners if c is not callback]

    def _append_locked(self, messages: Sequence[bytes]) -> None:
        now = self._clock()
        self._messages.extend(bytes(m) for m in messages)
        self._appended_at.extend(itertools.repeat(now, len(messages)))
        expired = bisect.bisect_left(self._appended_at, now - self._max_age_s)
        excess = max(len(self._messages) - self._maxlen, expired)
        if excess > 0:
            del self._messages[:excess]
            del self._appended_at[:excess]
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
