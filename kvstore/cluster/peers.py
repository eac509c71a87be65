"""``PeerFetcher``: raw-block GETs (read-through) and PUTs (migration) to other store nodes.

Blocking sockets, pooled per endpoint, thread-safe; frames through :mod:`kvstore.wire` like every
other client (a peer's GET carries ``FLAG_NO_FORWARD``, so the peer does not forward it again).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Sequence

from kvstore.blocks.format import BLOCK_HEADER_BYTES, verify
from kvstore.blocks.hashing import BlockKey
from kvstore.errors import KVStoreError
from kvstore.transport.tcp import hello, recv_bytes
from kvstore.wire import replies, requests
from kvstore.wire.frame import FRAME_HEADER_BYTES, FrameHeader
from strata_common.credentials import ClusterCredentials
from strata_common.endpoints import parse_endpoint

__all__ = ["PeerFetcher"]


_HELLO_ID = 0x7FFFFFF0
"""Request ids of a new connection's HELLO (the requests after it use small ids)."""


class PeerFetcher:
    """Raw-block GETs (and PUTs) to other store nodes over pooled blocking sockets; thread-safe."""

    def __init__(
        self, timeout_s: float = 5.0, *, credentials: ClusterCredentials | None = None
    ) -> None:
        self._timeout = timeout_s
        self._credentials = credentials
        self._lock = threading.Lock()
        self._idle: dict[str, list[socket.socket]] = {}

    def _connect(self, endpoint: str) -> socket.socket:
        with self._lock:
            pool = self._idle.get(endpoint)
            if pool:
                return pool.pop()
        address = parse_endpoint(endpoint)
        sock = socket.create_connection((address.host, address.port), timeout=self._timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._credentials is not None:
            try:
                hello(sock, self._credentials, _HELLO_ID)
            except BaseException:
                sock.close()
                raise
        return sock

    def _give_back(self, endpoint: str, sock: socket.socket) -> None:
        with self._lock:
            self._idle.setdefault(endpoint, []).append(sock)

    def get_block(self, endpoint: str, key: BlockKey) -> tuple[bytes, int] | None:
        """The verified raw block (header + payload) and the tier that served it, or None."""
        sock = self._connect(endpoint)
        try:
            sock.sendall(requests.get(1, key, from_peer=True))
            frame = _read_header(sock, 1)
            body = recv_bytes(sock, frame.payload_len)
        except BaseException:
            sock.close()
            raise
        self._give_back(endpoint, sock)
        try:
            if not replies.get_hit(frame):
                return None
            header = replies.decode_block_header(body[:BLOCK_HEADER_BYTES], len(body), key)
        except KVStoreError:
            return None
        if not verify(header, memoryview(body)[BLOCK_HEADER_BYTES:]):
            return None
        return body, frame.count

    def put_blocks(self, endpoint: str, blocks: Sequence[bytes | memoryview]) -> list[int]:
        """PUT raw blocks, pipelined; returns one status per block."""
        sock = self._connect(endpoint)
        try:
            for i, block in enumerate(blocks):
                for part in requests.put_raw(i + 1, block):
                    sock.sendall(part)
            statuses = []
            for i in range(len(blocks)):
                header = _read_header(sock, i + 1)
                recv_bytes(sock, header.payload_len)
                statuses.append(header.status)
        except BaseException:
            sock.close()
            raise
        self._give_back(endpoint, sock)
        return statuses

    def close(self) -> None:
        with self._lock:
            pools, self._idle = self._idle, {}
        for pool in pools.values():
            for sock in pool:
                with contextlib.suppress(OSError):
                    sock.close()


def _read_header(sock: socket.socket, request_id: int) -> FrameHeader:
    """The reply to ``request_id``; ConnectionError if the peer answers anything else."""
    raw = recv_bytes(sock, FRAME_HEADER_BYTES)
    try:
        return replies.decode_reply_header(raw, 0, request_id)
    except KVStoreError as exc:
        raise ConnectionError(f"bad frame from peer: {exc}") from exc
