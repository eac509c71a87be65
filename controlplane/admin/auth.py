"""Bearer-token authentication of the Admin service.

Every Admin RPC must carry the metadata ``authorization: Bearer <token>``, or (with cluster
credentials) come from a caller of role ``admin``: its TLS certificate, or in secret mode the
cluster key's ``Strata-HMAC`` proof (:func:`admin_interceptor`). Tokens are compared in
constant time (``compare_digest`` over SHA-256 digests, so not even the length leaks). A missing,
malformed or wrong token gets UNAUTHENTICATED before any handler runs; the health service needs
no token (it tells only SERVING or NOT_SERVING, as load balancers and probes expect).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from controlplane.admin.config import ADMIN_SERVICE_NAME
from strata_common.grpc_auth import ServerAuthInterceptor, roles_only

__all__ = [
    "BearerTokenInterceptor",
    "admin_interceptor",
    "token_matches",
]

logger = logging.getLogger(__name__)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def token_matches(metadata: Iterable[tuple[str, str | bytes]], expected: str) -> bool:
    """True when the metadata holds exactly one ``authorization: Bearer <expected>``.

    Constant time in the token: both sides are hashed to fixed-size digests and compared with
    ``hmac.compare_digest``.
    """
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        return False
    scheme, _, presented = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(_digest(presented.strip()), _digest(expected))


async def _deny(request: Any, context: Any) -> None:
    await context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or wrong admin token (metadata `authorization: Bearer <token>`)",
    )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every Admin RPC without the right token before its handler runs; other services
    on the server (health) pass through.

    With ``cluster`` (a :class:`strata_common.grpc_auth.ServerAuthInterceptor` whose policy lets
    role ``admin`` only), a call without a bearer token is the cluster's to judge instead: a
    caller proving ``admin/NAME`` (its TLS certificate, or in secret mode the cluster key's
    proof) gets through without the token (docs/design/security.md §5.1)."""

    _PREFIX = f"/{ADMIN_SERVICE_NAME}/"

    def __init__(self, token: str | None, cluster: ServerAuthInterceptor | None = None) -> None:
        if token is None and cluster is None:
            raise ValueError("the admin service needs a token or cluster credentials")
        self._token = token
        self._cluster = cluster
        # Every Admin RPC is unary-unary, so one refusing handler fits all of them.
        self._deny_handler = grpc.unary_unary_rpc_method_handler(_deny)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        if not details.method.startswith(self._PREFIX):
            return await continuation(details)
        metadata = tuple(details.invocation_metadata or ())
        if self._token is not None and token_matches(metadata, self._token):
            return await continuation(details)
        if self._cluster is not None and not _bearer(metadata):
            return await self._cluster.intercept_service(continuation, details)
        logger.warning("admin: refused %s (missing or wrong token)", details.method)
        return self._deny_handler


def _bearer(metadata: Iterable[tuple[str, str | bytes]]) -> bool:
    """Whether the call presents a bearer token (then the token alone decides)."""
    return any(
        k.lower() == "authorization" and isinstance(v, str) and v.lower().startswith("bearer ")
        for k, v in metadata
    )


def admin_interceptor(
    token: str | None, cluster_key: bytes | None, tls: bool
) -> BearerTokenInterceptor:
    """The admin service's check: ``token``, or role ``admin`` proved by a TLS certificate
    (``tls``) or the cluster key's proof (``cluster_key``)."""
    cluster = None
    if tls:
        cluster = ServerAuthInterceptor(None, roles_only("admin"))
    elif cluster_key is not None:
        cluster = ServerAuthInterceptor(cluster_key, roles_only("admin"))
    return BearerTokenInterceptor(token, cluster)
