"""A fault-injecting TCP proxy in front of a store node, for the tests that break KV transfers.

Clients (workers) connect to :attr:`StoreProxy.endpoint` instead of the node. The proxy reads
their requests frame by frame (the store's wire protocol: kvstore/wire/frame.py) and asks its
``on_request(op)`` hook what to do with each one before forwarding it:

- :attr:`Verdict.FORWARD` -- pass it on (replies always flow back unchanged);
- :attr:`Verdict.DROP` -- do not forward it; close the client's and the node's connection (the
  client sees a transfer broken mid-call, as when the node dies or the network drops it);
- :attr:`Verdict.HOLD` -- forward the frame header and half its payload, then stop: the
  client's connection is closed but the node's stays open, silent, until :meth:`close` (a
  client that died mid-request on a host that did not close its sockets: only the node's own
  timeouts free what the request holds).

The hook runs on the proxy's thread for that connection and may itself act (kill the node or
the worker) before answering.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import threading
from collections.abc import Callable

from kvstore.transport.tcp import recv_bytes
from kvstore.wire.frame import FRAME_HEADER, Op

__all__ = ["DATA_OPS", "SAVE_OPS", "StoreProxy", "Verdict"]

DATA_OPS = frozenset({int(Op.GET), int(Op.GET_SHM), int(Op.LEASE_BATCH)})
"""Requests for block data (a KV load)."""
SAVE_OPS = frozenset({int(Op.PUT), int(Op.RESERVE_BATCH), int(Op.COMMIT_BATCH)})
"""Requests that write blocks (a KV save)."""


class Verdict(enum.Enum):
    FORWARD = "forward"
    DROP = "drop"
    HOLD = "hold"


class StoreProxy:
    """Forwards TCP connections to the store node at ``upstream`` ("HOST:PORT"), asking
    ``on_request(op)`` about each request frame (default: forward everything)."""

    def __init__(self, upstream: str, on_request: Callable[[int], Verdict] | None = None) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self.on_request = on_request or (lambda op: Verdict.FORWARD)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closing = False
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {v.value: 0 for v in Verdict}
        """Request frames per verdict."""
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting; close the node-side connections HOLD kept open."""
        self._closing = True
        self._listener.close()
        with self._lock:
            held, self._held = self._held, []
        for sock in held:
            sock.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the node is gone: the client sees a refused transfer
                continue
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        hold = False
        try:
            while True:
                header = recv_bytes(client, FRAME_HEADER.size)
                fields = FRAME_HEADER.unpack(header)
                op, length = fields[2], fields[7]
                payload = recv_bytes(client, length)
                verdict = self.on_request(op)
                with self._lock:
                    self.counts[verdict.value] += 1
                if verdict is Verdict.FORWARD:
                    upstream.sendall(header + payload)
                    continue
                if verdict is Verdict.HOLD:
                    upstream.sendall(header + payload[: length // 2])
                    hold = True
                break
        except (OSError, ConnectionError):
            pass
        if hold:
            with self._lock:
                if self._closing:
                    upstream.close()
                else:
                    self._held.append(upstream)
            _close(client)
            return
        for sock in (client, upstream):
            _close(sock)

    @staticmethod
    def _replies(upstream: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(1 << 16):
                client.sendall(data)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
