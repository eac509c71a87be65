"""``PeerFetcher``: raw-block GETs (read-through), MATCH_PREFIX (a hinted peer) and PUTs
(migration) to other store nodes.

Blocking sockets, pooled per endpoint, thread-safe; frames through :mod:`kvstore.wire` like every
other client (a peer's GET carries ``FLAG_NO_FORWARD``, so the peer does not forward it again),
with the same bounds on replies (a block beyond ``max_block_bytes`` is never read). A pooled
socket the peer has closed meanwhile (its idle timeout) is replaced once, transparently. A call
may have a shorter timeout than the fetcher's (a hinted MATCH_PREFIX): the socket that timed out
is closed, never pooled (its reply may still come).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from kvstore.blocks.format import BLOCK_HEADER_BYTES, verify
from kvstore.blocks.hashing import BlockKey
from kvstore.blocks.tier import Tier
from kvstore.errors import KVStoreError
from kvstore.transport.tcp import hello, recv_bytes, secure
from kvstore.wire import replies, requests
from kvstore.wire.frame import DEFAULT_MAX_BLOCK_BYTES, FRAME_HEADER_BYTES, FrameHeader, Op
from strata_common.credentials import ClusterCredentials
from strata_common.endpoints import parse_endpoint

__all__ = ["PeerFetcher"]

_T = TypeVar("_T")


_HELLO_ID = 0x7FFFFFF0
"""Request ids of a new connection's HELLO (the requests after it use small ids)."""


class PeerFetcher:
    """Raw-block GETs (and PUTs) to other store nodes over pooled blocking sockets; thread-safe."""

    def __init__(
        self,
        timeout_s: float = 5.0,
        *,
        credentials: ClusterCredentials | None = None,
        max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    ) -> None:
        self._timeout = timeout_s
        self._credentials = credentials
        self.max_block_bytes = max_block_bytes
        self._lock = threading.Lock()
        self._idle: dict[str, list[socket.socket]] = {}

    def _call(
        self, endpoint: str, fn: Callable[[socket.socket], _T], timeout_s: float | None = None
    ) -> _T:
        """``fn`` on a pooled (or new) socket, given back afterwards; a pooled socket found
        closed by the peer is replaced and ``fn`` retried once (every op here is idempotent).
        ``timeout_s``: this call's socket timeout (connecting included), if not the fetcher's."""
        timeout = self._timeout if timeout_s is None else timeout_s
        with self._lock:
            pool = self._idle.get(endpoint)
            sock = pool.pop() if pool else None
        if sock is not None:
            try:
                sock.settimeout(timeout)
                result = fn(sock)
            except ConnectionError:
                sock.close()
            except BaseException:
                sock.close()
                raise
            else:
                self._give_back(endpoint, sock)
                return result
        sock = self._connect(endpoint, timeout)
        try:
            result = fn(sock)
        except BaseException:
            sock.close()
            raise
        self._give_back(endpoint, sock)
        return result

    def _connect(self, endpoint: str, timeout_s: float) -> socket.socket:
        address = parse_endpoint(endpoint)
        sock = socket.create_connection((address.host, address.port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = secure(sock, address.host, self._credentials)  # TLS mode: the peer is a store/*
        if self._credentials is not None:
            try:
                hello(sock, self._credentials, _HELLO_ID)
            except BaseException:
                sock.close()
                raise
        return sock

    def _give_back(self, endpoint: str, sock: socket.socket) -> None:
        sock.settimeout(self._timeout)
        with self._lock:
            self._idle.setdefault(endpoint, []).append(sock)

    def get_block(self, endpoint: str, key: BlockKey) -> tuple[bytes, int] | None:
        """The verified raw block (header + payload) and the tier that served it, or None."""
        return self.get_blocks(endpoint, [key])[0]

    def get_blocks(self, endpoint: str, keys: Sequence[BlockKey]) -> list[tuple[bytes, int] | None]:
        """:meth:`get_block` of each key, pipelined: every GET sent at once, the replies read in
        order (one round trip for the batch). None for a key the peer misses or sends damaged."""

        def run(sock: socket.socket) -> list[tuple[FrameHeader, bytes]]:
            sock.sendall(
                b"".join(requests.get(i + 1, key, from_peer=True) for i, key in enumerate(keys))
            )
            replies_read = []
            for i in range(len(keys)):
                frame = self._read_header(sock, i + 1, Op.GET)
                replies_read.append((frame, recv_bytes(sock, frame.payload_len)))
            return replies_read

        if not keys:
            return []
        return [
            _verified(key, frame, body)
            for key, (frame, body) in zip(keys, self._call(endpoint, run), strict=True)
        ]

    def match_prefix(
        self, endpoint: str, keys: Sequence[BlockKey], *, timeout_s: float
    ) -> list[Tier]:
        """The peer's tier of each leading key of ``keys`` it holds (at most MAX_KEYS_PER_FRAME
        keys; its own tiers only: the request is a peer's, never forwarded), within
        ``timeout_s`` (connecting included); OSError (TimeoutError) or KVStoreError else."""

        def run(sock: socket.socket) -> list[Tier]:
            sock.sendall(b"".join(requests.match_prefix(1, keys, from_peer=True)))
            header = self._read_header(sock, 1, Op.MATCH_PREFIX, len(keys))
            body = recv_bytes(sock, header.payload_len)
            replies.check_ok(header)
            return replies.decode_match_tiers(header, body, len(keys))

        if not keys:
            return []
        return self._call(endpoint, run, timeout_s)

    def put_blocks(self, endpoint: str, blocks: Sequence[bytes | memoryview]) -> list[int]:
        """PUT raw blocks, pipelined; returns one status per block."""

        def run(sock: socket.socket) -> list[int]:
            for i, block in enumerate(blocks):
                for part in requests.put_raw(i + 1, block):
                    sock.sendall(part)
            statuses = []
            for i in range(len(blocks)):
                header = self._read_header(sock, i + 1, Op.PUT)
                recv_bytes(sock, header.payload_len)
                statuses.append(header.status)
            return statuses

        return self._call(endpoint, run)

    def close(self) -> None:
        with self._lock:
            pools, self._idle = self._idle, {}
        for pool in pools.values():
            for sock in pool:
                with contextlib.suppress(OSError):
                    sock.close()

    def _read_header(
        self, sock: socket.socket, request_id: int, op: Op, asked: int = 1
    ) -> FrameHeader:
        """The reply to ``request_id``; ConnectionError if the peer answers anything else (or
        claims a longer reply than ``op``'s can be)."""
        raw = recv_bytes(sock, FRAME_HEADER_BYTES)
        try:
            return replies.decode_reply_header(
                raw, 0, request_id, op, max_block_bytes=self.max_block_bytes, asked=asked
            )
        except KVStoreError as exc:
            raise ConnectionError(f"bad frame from peer: {exc}") from exc


def _verified(key: BlockKey, frame: FrameHeader, body: bytes) -> tuple[bytes, int] | None:
    """The raw block of a GET reply and the tier it came from, if it is a hit that verifies."""
    try:
        if not replies.get_hit(frame):
            return None
        header = replies.decode_block_header(body[:BLOCK_HEADER_BYTES], len(body), key)
    except KVStoreError:
        return None
    if not verify(header, memoryview(body)[BLOCK_HEADER_BYTES:]):
        return None
    return body, frame.count
