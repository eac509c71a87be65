"""The TCP side every transport shares: the one receive loop of blocking kvstore sockets."""

from __future__ import annotations

import socket

from kvstore.wire import replies
from kvstore.wire.frame import FRAME_HEADER_BYTES, Op
from kvstore.wire.hello import ClientHello
from strata_common.credentials import ClusterCredentials

__all__ = ["hello", "recv_bytes", "recv_exact"]


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


def secure(sock: socket.socket, host: str, credentials: ClusterCredentials | None) -> socket.socket:
    """A new blocking socket to a store node at ``host``, wrapped in TLS when ``credentials``
    are TLS mode's (the node's certificate must name a ``store/*``), else as it is. On failure
    the socket is closed and the error raised: CredentialError (the node's identity), OSError
    (``ssl.SSLError`` for refused certificates or a plaintext node; a timeout)."""
    tls = None if credentials is None else credentials.tls
    if tls is None:
        return sock
    try:
        return tls.connect_ssl(sock, host, "store")
    except BaseException:
        sock.close()
        raise


def hello(sock: socket.socket, credentials: ClusterCredentials, request_id: int) -> None:
    """The HELLO handshake (kvstore.wire.hello) on a new blocking socket, with request ids
    ``request_id`` and ``request_id + 1``: KVStoreAuthError if either side's proof fails,
    KVStoreError for a garbled reply, OSError (ConnectionError, TimeoutError) from the socket."""
    handshake = ClientHello(credentials)
    sock.sendall(handshake.request(request_id))
    raw = recv_bytes(sock, FRAME_HEADER_BYTES)
    header = replies.decode_reply_header(raw, 0, request_id, Op.HELLO)  # ≤ HELLO_REPLY_BYTES
    body = recv_bytes(sock, header.payload_len)
    if handshake.tls:  # the TLS handshake proved both sides; the node accepted the identity
        handshake.accepted(header, body)
        return
    sock.sendall(handshake.answer(header, body, request_id + 1))
    raw = recv_bytes(sock, FRAME_HEADER_BYTES)
    ClientHello.finish(replies.decode_reply_header(raw, 0, request_id + 1, Op.HELLO_PROOF))
