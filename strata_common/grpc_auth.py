"""Authentication and authorisation of gRPC calls (docs/design/security.md §3, §5.1).

TLS mode: the server is bound with mutual TLS under the cluster CA (:func:`add_port`), the
interceptor given no key takes each caller's identity from its certificate
(:func:`strata_common.tls.grpc_peer_identity`) and the same policies decide; clients open their
channels with their certificate (:meth:`ClientAuth.from_tls`, :func:`aio_channel`,
:func:`blocking_channel`). The rest of this docstring is secret mode.

Every call to a guarded service carries the metadata ``authorization: Strata-HMAC id=ROLE/NAME,
ts=UNIX_SECONDS, mac=HEX`` (:func:`strata_common.credentials.rpc_authorization`: an HMAC under
the cluster key's ``rpc`` key over the identity, the full method name and the time).

Server side, :class:`ServerAuthInterceptor` (a ``grpc.aio`` server interceptor) wraps the handler
of every method except those of the exempt services (by default the standard
``grpc.health.v1.Health``: probes need no credential, and it tells only SERVING or NOT_SERVING).
Before the handler runs, the wrapper

1. checks the ``authorization`` metadata (exactly one value, within ``window_s`` of the server's
   clock, for this very method): otherwise **UNAUTHENTICATED**, with the reason;
2. asks the service's :data:`Authorize` policy about ``(identity, method, request)`` (the request
   is None for a client-streaming method): a refusal is **PERMISSION_DENIED**, with the reason;
3. runs the handler with the identity in :func:`current_identity` (a context variable).

Refusals are logged at most once per method and reason every :data:`LOG_INTERVAL_S`, so a
flood of bad calls cannot flood the log.

Client side, :class:`ClientAuth` (the cluster key and this process's identity) makes the metadata
of a call, and adds it to every call of a ``grpc.aio`` channel (:meth:`ClientAuth.aio_interceptors`)
or of a blocking channel (:meth:`ClientAuth.intercept`).

Secret mode proves that the caller holds the cluster key, not who it is: any holder can claim any
identity (§3.2). The policies still catch misrouting and misconfiguration, and name the caller.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, NamedTuple

import grpc

from strata_common.credentials import (
    RPC_WINDOW_S,
    CredentialError,
    Identity,
    check_rpc_authorization,
    rpc_authorization,
)
from strata_common.tls import TlsConfig, grpc_peer_identity

__all__ = [
    "AUTHORIZATION_KEY",
    "HEALTH_SERVICE",
    "LOG_INTERVAL_S",
    "Authorize",
    "ClientAuth",
    "ServerAuthInterceptor",
    "add_port",
    "aio_channel",
    "blocking_channel",
    "current_identity",
    "roles_only",
]

logger = logging.getLogger("strata_common.grpc_auth")

AUTHORIZATION_KEY: Final = "authorization"
HEALTH_SERVICE: Final = "grpc.health.v1.Health"
LOG_INTERVAL_S: Final = 60.0
"""A refusal of one method for one reason is logged at most once this often."""
_MAX_LOG_KEYS: Final = 1024

Authorize = Callable[[Identity, str, Any], str | None]
"""A service's policy: ``(identity, method, request)`` → None to allow, or the reason of a
refusal (told to the caller). ``method`` is the full name, ``/package.Service/Method``;
``request`` is the request message, or None for a client-streaming method."""

_IDENTITY: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "strata_grpc_identity", default=None
)


def current_identity() -> Identity | None:
    """The authenticated caller of the call being handled (None outside a guarded handler)."""
    return _IDENTITY.get()


def roles_only(*roles: str) -> Authorize:
    """A policy that lets the given roles call every method and refuses everyone else."""
    allowed = frozenset(roles)
    names = ", ".join(sorted(allowed))

    def authorize(identity: Identity, method: str, request: Any) -> str | None:
        if identity.role in allowed:
            return None
        return f"only role {names} may call it"

    return authorize


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


class ServerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks the credentials and the policy of every call before its handler (see the module
    docstring). Handlers must be async (coroutine or async-generator methods), as grpc.aio
    servicers are.

    ``key``: the cluster key (secret mode), or None for TLS mode: the identity is the one in
    the caller's certificate (UNAUTHENTICATED without one). ``clock`` (Unix seconds) is
    injectable for tests; ``exempt`` names services whose methods pass without credentials."""

    def __init__(
        self,
        key: bytes | None,
        authorize: Authorize,
        *,
        exempt: Iterable[str] = (HEALTH_SERVICE,),
        clock: Callable[[], float] = time.time,
        window_s: float = RPC_WINDOW_S,
    ) -> None:
        self._key = key
        self._authorize = authorize
        self._exempt = tuple(f"/{service}/" for service in exempt)
        self._clock = clock
        self._window_s = window_s
        self._logged: dict[tuple[str, str], float] = {}
        self.num_refused = 0

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(self._exempt):
            return handler
        metadata = tuple(details.invocation_metadata or ())
        return _wrap(
            handler, lambda request, context: self._check(method, metadata, request, context)
        )

    def authenticate(self, method: str, metadata: tuple[Any, ...], context: Any) -> Identity:
        """The caller's identity (CredentialError: why not): in TLS mode its certificate's, in
        secret mode the one its ``authorization`` metadata proves."""
        if self._key is None:
            return grpc_peer_identity(context)
        values = [value for key, value in metadata if key.lower() == AUTHORIZATION_KEY]
        if len(values) > 1 or (values and not isinstance(values[0], str)):
            raise CredentialError("malformed credentials")
        return check_rpc_authorization(
            self._key, values[0] if values else None, method, self._clock(), self._window_s
        )

    def _check(
        self, method: str, metadata: tuple[Any, ...], request: Any, context: Any
    ) -> Identity:
        """The caller's identity, or _Refusal."""
        try:
            identity = self.authenticate(method, metadata, context)
        except CredentialError as exc:
            raise self._refuse(
                grpc.StatusCode.UNAUTHENTICATED,
                method,
                str(exc),
                f"{method} needs cluster credentials: {exc}",
            ) from None
        reason = self._authorize(identity, method, request)
        if reason is not None:
            raise self._refuse(
                grpc.StatusCode.PERMISSION_DENIED,
                method,
                reason,
                f"{identity} may not call {method}: {reason}",
            )
        return identity

    def _refuse(self, code: grpc.StatusCode, method: str, reason: str, message: str) -> _Refusal:
        self.num_refused += 1
        now = time.monotonic()
        key = (method, reason)
        last = self._logged.get(key)
        if last is None or now - last >= LOG_INTERVAL_S:
            if len(self._logged) >= _MAX_LOG_KEYS:
                self._logged.clear()
            self._logged[key] = now
            logger.warning("refused a call (%s): %s", code.name, message)
        return _Refusal(code, message, reason)


def _wrap(handler: Any, check: Callable[[Any, Any], Identity]) -> Any:
    """``handler`` with ``check(request, context)`` before its behaviour, the identity set
    meanwhile."""

    async def enter(request: Any, context: Any) -> contextvars.Token[Identity | None]:
        try:
            identity = check(request, context)
        except _Refusal as refusal:
            await context.abort(refusal.code, refusal.message)
            raise AssertionError("unreachable: context.abort raises") from None
        return _IDENTITY.set(identity)

    def unary_response(behavior: Callable[..., Any], streaming_request: bool) -> Any:
        async def run(request: Any, context: Any) -> Any:
            token = await enter(None if streaming_request else request, context)
            try:
                return await behavior(request, context)
            finally:
                _IDENTITY.reset(token)

        return run

    def stream_response(behavior: Callable[..., Any], streaming_request: bool) -> Any:
        if inspect.isasyncgenfunction(behavior):

            async def generate(request: Any, context: Any) -> AsyncIterator[Any]:
                # No reset: grpc.aio runs each call in a task of its own (the variable is that
                # task's), and a generator cut short is closed from another context, where a
                # reset would fail (ValueError: the token was created in a different Context).
                await enter(None if streaming_request else request, context)
                async for response in behavior(request, context):
                    yield response

            return generate
        return unary_response(behavior, streaming_request)  # writes with context.write

    for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, name)
        if behavior is None:
            continue
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            raise TypeError(f"ServerAuthInterceptor guards async handlers only, not {behavior!r}")
        make = stream_response if handler.response_streaming else unary_response
        wrapped = make(behavior, handler.request_streaming)
        factory = getattr(grpc, f"{name}_rpc_method_handler")
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    raise TypeError("a method handler without a behaviour")


# -- client side -------------------------------------------------------------------------------


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _SyncCallDetails(_CallDetails, grpc.ClientCallDetails):  # type: ignore[misc]
    """A blocking call's details with the credentials added."""


class ClientAuth:
    """This process's cluster credentials as a gRPC client: in secret mode ``identity`` and the
    cluster key (the ``authorization`` metadata of every call), in TLS mode
    (:meth:`from_tls`) its certificate (the channel's credentials; the identity is the
    certificate's). Open channels with :func:`aio_channel` / :func:`blocking_channel`.

    ``clock`` (Unix seconds) stamps each call; injectable for tests."""

    def __init__(
        self, key: bytes, identity: Identity, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = key
        self.identity = identity
        self._clock = clock
        self.tls: TlsConfig | None = None

    @classmethod
    def from_tls(cls, tls: TlsConfig, role: str | None, key: bytes | None = None) -> ClientAuth:
        """TLS-mode credentials of a component of ``role`` (CredentialError if the certificate
        names another role; None: any role); ``key``: the cluster key, when the component has
        its file (TLS authenticates the calls; the key is for the MACs of Redis records)."""
        auth = cls(key or b"", tls.identity() if role is None else tls.check_role(role))
        auth.tls = tls
        return auth

    def __repr__(self) -> str:  # never the key
        return f"ClientAuth({self.identity}{', TLS' if self.tls is not None else ''})"

    @property
    def cluster_key(self) -> bytes | None:
        """The cluster key (for what is not a call: the MACs of Redis records); None in TLS
        mode without a key file."""
        return self._key or None

    def authorization(self, method: str | bytes) -> str:
        """The ``authorization`` value of one call to ``method`` (full name), made now."""
        if self.tls is not None:
            raise RuntimeError("TLS-mode credentials travel in the channel, not the metadata")
        name = method.decode() if isinstance(method, bytes) else method
        return rpc_authorization(self._key, self.identity, name, self._clock())

    def metadata(self, method: str | bytes, given: Any = None) -> list[tuple[str, Any]]:
        """``given`` metadata without any ``authorization`` entry, plus ours."""
        kept = [(k, v) for k, v in (given or ()) if k.lower() != AUTHORIZATION_KEY]
        return [*kept, (AUTHORIZATION_KEY, self.authorization(method))]

    def aio_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """Interceptors for ``grpc.aio.insecure_channel(..., interceptors=...)``."""
        return [
            _AioUnaryUnary(self),
            _AioUnaryStream(self),
            _AioStreamUnary(self),
            _AioStreamStream(self),
        ]

    def intercept(self, channel: grpc.Channel) -> grpc.Channel:
        """``channel`` (blocking) with the credentials added to every call."""
        return grpc.intercept_channel(channel, _SyncInterceptor(self))

    def aio_details(self, details: Any) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*self.metadata(details.method, details.metadata)),
            details.credentials,
            details.wait_for_ready,
        )


def aio_channel(
    target: str, auth: ClientAuth | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``target`` with ``auth``'s credentials: mutual TLS in TLS mode,
    the metadata on every call in secret mode, nothing without credentials."""
    if auth is not None and auth.tls is not None:
        credentials = auth.tls.grpc_channel_credentials()
        return grpc.aio.secure_channel(target, credentials, options=list(options))
    interceptors = None if auth is None else auth.aio_interceptors()
    return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)


def blocking_channel(
    target: str, auth: ClientAuth | None, options: Sequence[tuple[str, Any]] = ()
) -> tuple[grpc.Channel, grpc.Channel]:
    """(the channel to close, the channel to call through) to ``target`` with ``auth``'s
    credentials, as :func:`aio_channel` but blocking."""
    if auth is not None and auth.tls is not None:
        credentials = auth.tls.grpc_channel_credentials()
        channel = grpc.secure_channel(target, credentials, options=list(options))
        return channel, channel
    channel = grpc.insecure_channel(target, options=list(options))
    return channel, channel if auth is None else auth.intercept(channel)


def add_port(server: grpc.aio.Server, tls: TlsConfig | None) -> Callable[[str], int]:
    """The ``add_*_port`` of ``server`` for ``tls`` (for :func:`strata_common.endpoints.bind_port`):
    mutual TLS under the cluster CA, or plaintext without TLS."""
    if tls is None or not tls.enabled:
        return server.add_insecure_port  # type: ignore[no-any-return]
    credentials = tls.grpc_server_credentials()
    return lambda address: server.add_secure_port(address, credentials)


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, auth: ClientAuth) -> None:
        self._auth = auth

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._auth.aio_details(details), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, auth: ClientAuth) -> None:
        self._auth = auth

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._auth.aio_details(details), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, auth: ClientAuth) -> None:
        self._auth = auth

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._auth.aio_details(details), requests)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, auth: ClientAuth) -> None:
        self._auth = auth

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._auth.aio_details(details), requests)


class _SyncInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    def __init__(self, auth: ClientAuth) -> None:
        self._auth = auth

    def _details(self, details: Any) -> _SyncCallDetails:
        return _SyncCallDetails(
            details.method,
            details.timeout,
            self._auth.metadata(details.method, details.metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)
