"""The HELLO handshake's messages and the client's side of it (sans-I/O; docs/design/security.md
§4.1). The node's side is :mod:`kvstore.server.auth`.

A client given :class:`~strata_common.credentials.ClusterCredentials` runs, right after it
connects and before anything else::

    hello = ClientHello(credentials)
    send(hello.request(request_id))                     # HELLO: nonce_c + identity
    send(hello.answer(reply_header, reply_body, rid2))  # checks the node's proof; HELLO_PROOF
    hello.finish(proof_reply_header)                    # OK, or KVStoreAuthError

so both sides prove they hold the cluster key over fresh nonces: a node without the key cannot
pass for one, a client without it gets nothing but UNAUTHENTICATED.

In TLS mode (credentials with ``tls``) the TLS handshake has authenticated both sides; HELLO
carries the identity, which the node checks equals the client certificate's, and its empty OK
ends the handshake (:meth:`ClientHello.accepted`; there is no HELLO_PROOF).
"""

from __future__ import annotations

import hmac
import os

from kvstore.errors import KVStoreAuthError
from kvstore.wire.frame import FrameHeader, Op, Status, pack_frame_header
from kvstore.wire.messages import (
    HELLO_NONCE_BYTES,
    HELLO_PROOF_BYTES,
    HELLO_REPLY_BYTES,
    MAX_IDENTITY_BYTES,
)
from strata_common.credentials import ClusterCredentials, CredentialError, Identity, hello_proof

__all__ = ["ClientHello", "decode_hello", "hello_reply"]


def decode_hello(payload: bytes | memoryview) -> tuple[Identity, bytes]:
    """(identity, client nonce) of a HELLO request; CredentialError if it is malformed."""
    nonce = bytes(payload[:HELLO_NONCE_BYTES])
    try:
        text = bytes(payload[HELLO_NONCE_BYTES:]).decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialError("identity is not UTF-8") from None
    return Identity.parse(text), nonce


def hello_reply(request_id: int, node_nonce: bytes, proof: bytes) -> bytes:
    return pack_frame_header(Op.HELLO, request_id, 0, HELLO_REPLY_BYTES) + node_nonce + proof


class ClientHello:
    """One client handshake: the HELLO request, the check of the node's answer, the proof."""

    __slots__ = ("_credentials", "_nonce")

    def __init__(self, credentials: ClusterCredentials, nonce: bytes | None = None) -> None:
        self._credentials = credentials
        self._nonce = nonce if nonce is not None else os.urandom(HELLO_NONCE_BYTES)
        if len(self._nonce) != HELLO_NONCE_BYTES:
            raise ValueError(f"a HELLO nonce is {HELLO_NONCE_BYTES} bytes")

    def request(self, request_id: int) -> bytes:
        identity = str(self._credentials.identity).encode()
        if len(identity) > MAX_IDENTITY_BYTES:
            raise ValueError(f"identity longer than {MAX_IDENTITY_BYTES} bytes")
        body = self._nonce + identity
        return pack_frame_header(Op.HELLO, request_id, 0, len(body)) + body

    def answer(
        self, header: FrameHeader, body: bytes | bytearray | memoryview, request_id: int
    ) -> bytes:
        """The HELLO_PROOF request after checking the node's HELLO reply (``header``, ``body``);
        KVStoreAuthError if the node did not prove it holds the cluster key."""
        if header.status != Status.OK or len(body) != HELLO_REPLY_BYTES:
            raise KVStoreAuthError(
                "the node does not hold a cluster key (it was started without --cluster-key-file)"
                if header.status == Status.OK and not len(body)
                else f"bad HELLO reply (status {header.status}, {len(body)} bytes)"
            )
        node_nonce = bytes(body[:HELLO_NONCE_BYTES])
        key, identity = self._credentials.key, self._credentials.identity
        expected = hello_proof(key, "node", identity, self._nonce, node_nonce)
        if not hmac.compare_digest(expected, bytes(body[HELLO_NONCE_BYTES:])):
            raise KVStoreAuthError("the node's HELLO proof is wrong: it holds another cluster key")
        proof = hello_proof(key, "client", identity, self._nonce, node_nonce)
        assert len(proof) == HELLO_PROOF_BYTES
        return pack_frame_header(Op.HELLO_PROOF, request_id, 0, HELLO_PROOF_BYTES) + proof

    @property
    def tls(self) -> bool:
        """TLS mode: the node's reply to HELLO ends the handshake (:meth:`accepted`)."""
        return self._credentials.tls is not None

    @staticmethod
    def accepted(header: FrameHeader, body: bytes | bytearray | memoryview) -> None:
        """TLS mode: check the node's reply to HELLO, an empty OK (it accepted the identity)."""
        if header.status != Status.OK or len(body):
            raise KVStoreAuthError(
                f"bad HELLO reply in TLS mode (status {header.status}, {len(body)} bytes)"
            )

    @staticmethod
    def finish(header: FrameHeader) -> None:
        """Check the HELLO_PROOF reply (an UNAUTHENTICATED one raised when it was decoded)."""
        if header.status != Status.OK:
            raise KVStoreAuthError(f"the node refused the HELLO proof (status {header.status})")
