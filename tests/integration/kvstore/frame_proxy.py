"""A fault-injecting TCP proxy that forwards a store node's wire protocol frame by frame.

Tests put it between a client and a node (``FrameProxy(node.endpoint)``, then connect the client
to ``proxy.endpoint``) and act on individual frames through two hooks, one per direction:
``on_request(conn, header, payload)`` for client → node frames and ``on_reply(...)`` for
node → client frames. ``conn`` numbers the proxied connections from 0; ``payload`` is a mutable
copy the hook may change in place (flip bits: the frame goes on with the new bytes). A hook
returns what happens to the frame:

- ``FORWARD`` (or ``None``): the whole frame goes on;
- ``CUT``: nothing of it goes on and both sides of that connection are closed, as a peer that
  died right before sending it;
- ``Hold(nbytes, then)``: the first ``nbytes`` of the frame (header included) go on, then the
  direction stops (``proxy.holding`` is set) until :meth:`FrameProxy.release`; after that the
  rest is forwarded (``then="forward"``, a slow peer) or the connection is cut
  (``then="cut"``, a peer that died part-way through the frame). If the sender closes its
  connection while held (its process was killed), the connection is cut at once.
  ``then="abandon"`` does not wait: the sender's side is closed at once and the receiver's stays
  open and silent until :meth:`FrameProxy.close` (a peer that died mid-frame on a host that did
  not close its sockets: only the receiver's own timeouts free what the frame holds).

``DATA_OPS`` and ``SAVE_OPS`` name the requests of a KV load and of a KV save, for hooks.

Frames are parsed with the wire codec's own ``FrameHeader`` (kvstore/wire/frame.py), so the
proxy never packs a header itself. Whatever a side closes is propagated to the other side.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from kvstore.transport.tcp import recv_bytes
from kvstore.wire.frame import FRAME_HEADER_BYTES, FrameHeader, Op

__all__ = [
    "CUT",
    "DATA_OPS",
    "FORWARD",
    "SAVE_OPS",
    "FrameProxy",
    "Hold",
    "Hook",
    "Verdict",
]

DATA_OPS = frozenset({int(Op.GET), int(Op.GET_SHM), int(Op.LEASE_BATCH)})
"""Requests for block data (a KV load)."""
SAVE_OPS = frozenset({int(Op.PUT), int(Op.RESERVE_BATCH), int(Op.COMMIT_BATCH)})
"""Requests that write blocks (a KV save)."""


@dataclass(frozen=True)
class Hold:
    nbytes: int
    then: Literal["forward", "cut", "abandon"] = "cut"


FORWARD: Final = "forward"
CUT: Final = "cut"
Verdict = Hold | Literal["forward", "cut"] | None
Hook = Callable[[int, FrameHeader, bytearray], Verdict]


class FrameProxy:
    def __init__(
        self,
        target: str,
        *,
        on_request: Hook | None = None,
        on_reply: Hook | None = None,
    ) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host.strip("[]"), int(port))
        self.on_request = on_request
        self.on_reply = on_reply
        self.holding = threading.Event()
        """Set while a direction is held by a ``Hold`` verdict."""
        self._release = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._connections = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        """Let every held direction go on (forward its rest or cut, as its verdict said)."""
        self._release.set()

    def close(self) -> None:
        self._closed = True
        self._release.set()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)
            sock.close()

    def __enter__(self) -> FrameProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                node = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()  # the node is down: the client sees its connection fail
                continue
            node.settimeout(None)
            with self._lock:
                conn = self._connections
                self._connections += 1
                self._sockets += [client, node]
            for src, dst, hook in ((client, node, self.on_request), (node, client, self.on_reply)):
                args = (conn, src, dst, hook)
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, conn: int, src: socket.socket, dst: socket.socket, hook: Hook | None) -> None:
        try:
            while True:
                head = recv_bytes(src, FRAME_HEADER_BYTES)
                header = FrameHeader.decode(head)
                payload = bytearray(recv_bytes(src, header.payload_len))
                verdict = hook(conn, header, payload) if hook is not None else None
                frame = head + bytes(payload)
                if verdict == CUT:
                    break
                if isinstance(verdict, Hold):
                    dst.sendall(frame[: verdict.nbytes])
                    if verdict.then == "abandon":
                        _shut(src)  # dst stays open, silent, until close()
                        return
                    self.holding.set()
                    released = self._hold(src)
                    if not released or verdict.then == CUT or self._closed:
                        break
                    dst.sendall(frame[verdict.nbytes :])
                    continue
                dst.sendall(frame)
        except (OSError, ConnectionError, ValueError):
            pass  # a side closed (or sent a frame that does not parse): close both
        for sock in (src, dst):
            _shut(sock)

    def _hold(self, src: socket.socket) -> bool:
        """Wait for :meth:`release` (True) -- or for the sender to close (False: as it died,
        the held frame is cut off there, and the receiver sees the connection close)."""
        while not self._release.wait(0.02):
            readable, _, _ = select.select([src], [], [], 0)
            if readable:
                try:
                    if not src.recv(1, socket.MSG_PEEK):
                        return False
                except OSError:
                    return False
        return True


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
