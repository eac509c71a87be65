"""The node's side of the HELLO handshake and the op rules by role (docs/design/security.md §4).

A node started with a cluster key (``--cluster-key-file``) serves a connection only once it has
proved it holds the key: :func:`admit` answers any other first request UNAUTHENTICATED and closes
the connection; :data:`HANDLERS` answers HELLO (the node's nonce and its own proof, so a client
can tell a real node) and HELLO_PROOF (the client's proof, checked in constant time). Once
authenticated, a connection's role decides which ops it may use (:data:`ALLOWED_OPS`); any other
gets FORBIDDEN and the connection stays. A node without a key answers HELLO with an empty OK
(clients that hold a key then refuse it: it is not a node of their cluster) and checks nothing.
"""

from __future__ import annotations

import hmac
import os
from typing import TYPE_CHECKING, Final

from kvstore.wire.frame import FrameHeader, Op, Status, pack_frame_header
from kvstore.wire.hello import decode_hello, hello_reply
from kvstore.wire.messages import HELLO_NONCE_BYTES
from strata_common.credentials import CredentialError, Identity, hello_proof
from strata_common.tls import ssl_peer_identity

if TYPE_CHECKING:
    import asyncio

    from kvstore.server.connection import Connection

__all__ = ["ALLOWED_OPS", "HANDLERS", "NO_REPLY_OPS", "ConnectionAuth", "admit", "allowed"]

_DATA_OPS = frozenset(
    {
        Op.PUT,
        Op.GET,
        Op.GET_SHM,
        Op.RELEASE,
        Op.SHM_INFO,
        Op.LEASE_BATCH,
        Op.RELEASE_BATCH,
        Op.RESERVE_BATCH,
        Op.COMMIT_BATCH,
        Op.RDMA_CONNECT,
    }
)
_LOOKUPS = frozenset({Op.MATCH_PREFIX, Op.EXISTS, Op.STATS})
ALLOWED_OPS: Final[dict[str, frozenset[Op]]] = {
    "worker": _DATA_OPS | _LOOKUPS | {Op.DELETE},  # DELETE: blocks that fail verification
    "gateway": _LOOKUPS,
    # read-through, a hinted MATCH_PREFIX, migration
    "store": frozenset({Op.GET, Op.MATCH_PREFIX, Op.PUT, Op.EXISTS, Op.STATS}),
    "admin": frozenset({Op.STATS, Op.DELETE}),
}
"""What each role may ask once authenticated (HELLO and HELLO_PROOF are always allowed)."""
NO_REPLY_OPS: Final = frozenset({Op.RELEASE, Op.RELEASE_BATCH})
_HANDSHAKE = frozenset({Op.HELLO, Op.HELLO_PROOF})


class ConnectionAuth:
    """One connection's handshake state: who it claims to be, then who it proved to be."""

    __slots__ = ("_challenge", "certificate", "identity", "refused")

    def __init__(self) -> None:
        self.certificate: Identity | None = None
        """TLS mode: the identity in the client's certificate (HELLO must name it)."""
        self.identity: Identity | None = None
        """Set once the connection proved it holds the cluster key."""
        self._challenge: tuple[Identity, bytes, bytes] | None = None
        self.refused = False
        """Refused once: nothing more of it is answered (it is closing)."""


def allowed(identity: Identity | None, op: Op) -> bool:
    """Whether ``identity`` may use ``op`` (anyone may on a node without a key: None)."""
    return identity is None or op in _HANDSHAKE or op in ALLOWED_OPS[identity.role]


def connected(conn: Connection, transport: asyncio.BaseTransport) -> bool:
    """TLS mode: note the identity in the client's certificate (verified by the handshake);
    False (the connection is dropped) if it names none."""
    if conn.server.tls is None:
        return True
    try:
        conn.auth.certificate = ssl_peer_identity(transport.get_extra_info("ssl_object"))
    except CredentialError as exc:
        conn.server.log.warning(
            "unauthenticated", "dropping a TLS connection from %s: %s", conn.peer, exc
        )
        return False
    return True


def admit(conn: Connection, header: FrameHeader) -> bool:
    """Whether the connection may go on to handle this request. A node with a key refuses every
    request but the handshake's until the connection is authenticated: UNAUTHENTICATED, and the
    connection is closed (nothing of the request is read or done)."""
    if conn.auth.refused:
        return False  # refused earlier: what it had already sent is not answered
    if not conn.server.authenticates or header.opcode in _HANDSHAKE:
        return True
    if conn.auth.identity is not None:
        return True
    _refuse(conn, header, "request before HELLO")
    return False


def _refuse(conn: Connection, header: FrameHeader, why: str) -> None:
    conn.server.log.warning(
        "unauthenticated", "closing an unauthenticated connection from %s: %s", conn.peer, why
    )
    conn.auth.refused = True
    conn.write(pack_frame_header(header.opcode, header.request_id, 0, 0, Status.UNAUTHENTICATED))
    conn.close()


def _hello(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    key = conn.server.cluster_key
    if not conn.server.authenticates:  # no credentials here: an empty OK (a keyed client
        conn.write(pack_frame_header(Op.HELLO, header.request_id, 0, 0))  # refuses it)
        return
    if conn.auth.identity is not None or conn.auth._challenge is not None:
        _refuse(conn, header, "a second HELLO")
        return
    try:
        identity, client_nonce = decode_hello(payload)
    except CredentialError as exc:
        _refuse(conn, header, f"malformed HELLO: {exc}")
        return
    if conn.server.tls is not None:  # TLS mode: the certificate proved who it is
        if identity != conn.auth.certificate:
            _refuse(conn, header, f"HELLO as {identity}, certificate of {conn.auth.certificate}")
            return
        conn.auth.identity = identity
        conn.write(pack_frame_header(Op.HELLO, header.request_id, 0, 0))
        return
    assert key is not None
    node_nonce = os.urandom(HELLO_NONCE_BYTES)
    conn.auth._challenge = (identity, client_nonce, node_nonce)
    proof = hello_proof(key, "node", identity, client_nonce, node_nonce)
    conn.write(hello_reply(header.request_id, node_nonce, proof))


def _hello_proof(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    key, challenge = conn.server.cluster_key, conn.auth._challenge
    if key is None or challenge is None or conn.server.tls is not None:
        _refuse(conn, header, "HELLO_PROOF without a HELLO")
        return
    identity, client_nonce, node_nonce = challenge
    conn.auth._challenge = None
    expected = hello_proof(key, "client", identity, client_nonce, node_nonce)
    if not hmac.compare_digest(expected, bytes(payload)):
        _refuse(conn, header, f"wrong proof for {identity}")
        return
    conn.auth.identity = identity
    conn.write(pack_frame_header(Op.HELLO_PROOF, header.request_id, 0, 0))


def forbidden(conn: Connection, header: FrameHeader, payload: memoryview) -> None:
    """The answer to an op the connection's role may not use."""
    conn.server.log.warning(
        "forbidden",
        "%s (%s) may not use %s",
        conn.auth.identity,
        conn.peer,
        header.opcode.name,
    )
    if header.opcode not in NO_REPLY_OPS:
        conn.write(pack_frame_header(header.opcode, header.request_id, 0, 0, Status.FORBIDDEN))


HANDLERS = {Op.HELLO: _hello, Op.HELLO_PROOF: _hello_proof}
