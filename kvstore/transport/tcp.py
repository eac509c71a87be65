"""The TCP side every transport shares: the one receive loop of blocking kvstore sockets."""

from __future__ import annotations

import socket

__all__ = ["recv_bytes", "recv_exact"]


def recv_exact(sock: socket.socket, target: memoryview) -> None:
    """Fill ``target`` from a blocking socket (the one receive loop of every sync kvstore socket).

    Raises :class:`ConnectionError` if the peer closes first; a timeout (:class:`TimeoutError`)
    or another :class:`OSError` propagates for the caller to map onto its errors."""
    while target.nbytes:
        received = sock.recv_into(target)
        if not received:
            raise ConnectionError("connection closed by the node")
        target = target[received:]


def recv_bytes(sock: socket.socket, nbytes: int) -> bytes:
    """The next ``nbytes`` of a blocking socket, as bytes (:func:`recv_exact` into a new buffer)."""
    buffer = bytearray(nbytes)
    recv_exact(sock, memoryview(buffer))
    return bytes(buffer)
