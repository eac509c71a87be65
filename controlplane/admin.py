"""The admin gRPC service (proto/strata_proto/admin.proto) and the standard gRPC health service.

The service is a thin, strict shell around :class:`~controlplane.instances.AdminBackend` (the
registry): it authenticates the caller, checks every argument, calls the backend, and turns the
result into protobuf or the backend's error into a status code. Nothing protobuf-shaped reaches the
backend; nothing backend-shaped leaves except as protobuf.

Authentication (secure by default):

- Every Admin RPC must carry the metadata ``authorization: Bearer <token>``. The expected token
  comes from :class:`AdminConfig` (the gateway's config) or else the ``STRATA_ADMIN_TOKEN``
  environment variable; it must be at least :data:`MIN_TOKEN_CHARS` characters. Tokens are compared
  in constant time (HMAC-style ``compare_digest`` over SHA-256 digests, so not even the length
  leaks). A missing, malformed or wrong token gets UNAUTHENTICATED before any handler runs.
- With no token the server refuses to start (:class:`AdminConfigError`), unless the config says
  ``allow_unauthenticated=True`` *and* the bind address is loopback; then it starts with a warning.
- The health service (``grpc.health.v1.Health``) needs no token: it tells only SERVING or
  NOT_SERVING, as load balancers and Kubernetes gRPC probes expect.
- The channel is plaintext gRPC: bind the admin port to loopback or a private network, or put it
  behind a TLS-terminating proxy.

Status codes: bad arguments (checked here before the backend is called, and
:class:`InvalidAdminRequest` from the backend) → INVALID_ARGUMENT; :class:`InstanceNotFound` →
NOT_FOUND; :class:`InstanceConflict` → ALREADY_EXISTS for ``Add`` (the endpoint is registered
already) and FAILED_PRECONDITION elsewhere; anything else → INTERNAL with the traceback logged.
The service keeps serving after every error.

Use from the gateway::

    server = AdminServer(AdminConfig.resolve(port=50050), backend)
    port = await server.start()          # health: NOT_SERVING
    await server.set_ready(True)         # health: SERVING once the gateway takes traffic
    ...
    await server.stop(grace_s=5.0)       # health: NOT_SERVING, then in-flight calls finish
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controlplane.instances import (
    AdminBackend,
    ClusterStats,
    InstanceConflict,
    InstanceInfo,
    InstanceNotFound,
    InstanceState,
    InvalidAdminRequest,
    WorkerRole,
)
from strata_common.endpoints import EndpointError, format_endpoint, parse_endpoint
from strata_common.options import option
from strata_proto import admin_pb2, admin_pb2_grpc

__all__ = [
    "ADMIN_SERVICE_NAME",
    "ADMIN_TOKEN_ENV",
    "DEFAULT_ADMIN_PORT",
    "DEFAULT_REMOVE_WAIT_S",
    "MAX_REMOVE_WAIT_S",
    "MAX_REPLICAS",
    "MIN_TOKEN_CHARS",
    "AdminApiConfig",
    "AdminConfig",
    "AdminConfigError",
    "AdminServer",
    "AdminService",
    "check_endpoint",
    "instance_from_proto",
    "instance_to_proto",
    "role_from_name",
    "role_name",
    "stats_from_proto",
    "stats_to_proto",
    "token_matches",
]

logger = logging.getLogger(__name__)

ADMIN_SERVICE_NAME = "strata.admin.v1.Admin"
ADMIN_TOKEN_ENV = "STRATA_ADMIN_TOKEN"
DEFAULT_ADMIN_PORT = 50050
MIN_TOKEN_CHARS = 16
"""Shorter tokens are refused at start-up (`openssl rand -hex 32` makes a good one)."""
MAX_REPLICAS = 64
"""Most replicas one Scale call may ask for: a typo must not fork a thousand engines."""
DEFAULT_REMOVE_WAIT_S = 30.0
MAX_REMOVE_WAIT_S = 3600.0
MAX_ID_CHARS = 128
_POLICY_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")

# -- configuration ---------------------------------------------------------------------------


class AdminConfigError(ValueError):
    """The admin service cannot start with this configuration."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """Where the admin service listens and how it authenticates; validated on construction."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_ADMIN_PORT
    """0 = any free port (:meth:`AdminServer.start` returns the one bound)."""
    token: str | None = None
    """The expected bearer token; see :meth:`resolve` for the environment fallback."""
    allow_unauthenticated: bool = False
    """Serve without a token. Only allowed on a loopback address, and only when no token is set."""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise AdminConfigError(f"admin port must be in [0, 65535], got {self.port}")
        if not self.host:
            raise AdminConfigError("admin host must not be empty")
        if self.token is not None:
            if self.allow_unauthenticated:
                raise AdminConfigError(
                    "an admin token is set and allow_unauthenticated is on: choose one"
                )
            if len(self.token) < MIN_TOKEN_CHARS:
                raise AdminConfigError(
                    f"the admin token must be at least {MIN_TOKEN_CHARS} characters "
                    "(e.g. `openssl rand -hex 32`)"
                )
            if any(c.isspace() for c in self.token) or not self.token.isprintable():
                raise AdminConfigError("the admin token must be printable, without whitespace")
        elif not self.allow_unauthenticated:
            raise AdminConfigError(
                f"no admin token: set {ADMIN_TOKEN_ENV} (or the admin token in the gateway "
                "config); to serve without one, bind to loopback and set allow_unauthenticated"
            )
        elif not _is_loopback(self.host):
            raise AdminConfigError(
                f"refusing to serve the admin API without a token on {self.host}: "
                "allow_unauthenticated is only allowed on a loopback address"
            )

    @property
    def requires_token(self) -> bool:
        return self.token is not None

    @classmethod
    def resolve(
        cls,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_ADMIN_PORT,
        token: str | None = None,
        allow_unauthenticated: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> AdminConfig:
        """The config's own token wins; else ``STRATA_ADMIN_TOKEN`` (an empty value counts as
        unset); else none (which needs ``allow_unauthenticated``)."""
        env = os.environ if environ is None else environ
        if not token:
            token = env.get(ADMIN_TOKEN_ENV) or None
        return cls(host=host, port=port, token=token, allow_unauthenticated=allow_unauthenticated)


def read_token_file(path: str) -> str:
    """The admin token kept in a file (first line, surrounding whitespace dropped): a token on
    the command line would be visible to every user in `ps`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminConfigError(f"cannot read the admin token file {path!r}: {exc}") from None
    token = text.strip()
    if not token or "\n" in token:
        raise AdminConfigError(f"admin token file {path!r} must hold one non-empty line")
    return token


@dataclass(frozen=True, slots=True)
class AdminApiConfig:
    """The gateway's admin API settings (its ``--admin-*`` flags): off unless ``port`` is set."""

    host: str = option("127.0.0.1", help="address the admin API listens on")
    port: int | None = option(
        None, help="serve the admin API on this port (0 = any free port; none = off)"
    )
    token: str = option(
        "",
        flag="token-file",
        parse=read_token_file,
        metavar="PATH",
        repr=False,
        help=f"file holding the admin token (default: ${ADMIN_TOKEN_ENV})",
    )
    """The admin API's bearer token; "" = the STRATA_ADMIN_TOKEN environment variable. Needed
    whenever the admin API is on (at least 16 characters)."""

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise AdminConfigError(f"admin_port {self.port} must be in 0..65535")
        if not self.host:
            raise AdminConfigError("admin_host must be non-empty")

    def server_config(self, environ: Mapping[str, str] | None = None) -> AdminConfig | None:
        """The admin server's config (None while the API is off); the token is this config's,
        else ``$STRATA_ADMIN_TOKEN``. Raises :class:`AdminConfigError` when none is usable."""
        if self.port is None:
            return None
        return AdminConfig.resolve(
            host=self.host, port=self.port, token=self.token or None, environ=environ
        )


# -- argument checks and conversions ---------------------------------------------------------


def role_name(role: WorkerRole) -> str:
    """``prefill``, ``decode``, ``both`` (``unspecified``): as the worker's --role spells it."""
    return role.name.lower()


def role_from_name(name: str) -> WorkerRole:
    try:
        role = WorkerRole[name.upper()]
    except KeyError:
        role = WorkerRole.UNSPECIFIED
    if role is WorkerRole.UNSPECIFIED:
        raise InvalidAdminRequest(f"unknown role {name!r} (expected prefill, decode or both)")
    return role


def check_endpoint(text: str) -> str:
    """``HOST:PORT`` (IPv6 in brackets; :func:`strata_common.endpoints.parse_endpoint`), or
    :class:`InvalidAdminRequest` saying why not."""
    try:
        return str(parse_endpoint(text))
    except EndpointError as exc:
        raise InvalidAdminRequest(str(exc)) from None


def _check_role(value: int, allowed: Iterable[WorkerRole], what: str) -> WorkerRole:
    allowed = tuple(allowed)
    try:
        role = WorkerRole(value)
    except ValueError:
        role = WorkerRole.UNSPECIFIED
    if role not in allowed:
        names = ", ".join(role_name(r) for r in allowed)
        shown = role_name(role) if role is not WorkerRole.UNSPECIFIED else f"{value} (unset)"
        raise InvalidAdminRequest(f"{what}: role must be one of {names}, got {shown}")
    return role


_ANY_ROLE = (WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.BOTH)
_POOL_ROLES = (WorkerRole.PREFILL, WorkerRole.DECODE)


def _check_id(instance_id: str) -> str:
    if not instance_id:
        raise InvalidAdminRequest("instance id must not be empty")
    if len(instance_id) > MAX_ID_CHARS or not instance_id.isprintable() or " " in instance_id:
        raise InvalidAdminRequest(f"malformed instance id {instance_id[:MAX_ID_CHARS]!r}")
    return instance_id


def _check_replicas(replicas: int) -> int:
    if not 0 <= replicas <= MAX_REPLICAS:
        raise InvalidAdminRequest(f"replicas must be in [0, {MAX_REPLICAS}], got {replicas}")
    return replicas


def _check_wait_s(wait_s: float) -> float:
    if not (math.isfinite(wait_s) and 0 <= wait_s <= MAX_REMOVE_WAIT_S):
        raise InvalidAdminRequest(f"wait_s must be in [0, {MAX_REMOVE_WAIT_S:g}], got {wait_s}")
    return wait_s


def _check_policy_name(name: str) -> str:
    if not _POLICY_NAME.fullmatch(name):
        raise InvalidAdminRequest(
            f"malformed policy name {name[:64]!r} (lower-case letters, digits and '_')"
        )
    return name


_STATE_TO_PROTO = {
    InstanceState.STARTING: admin_pb2.INSTANCE_STATE_STARTING,
    InstanceState.READY: admin_pb2.INSTANCE_STATE_READY,
    InstanceState.DRAINING: admin_pb2.INSTANCE_STATE_DRAINING,
    InstanceState.DEAD: admin_pb2.INSTANCE_STATE_DEAD,
}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}


def instance_to_proto(info: InstanceInfo) -> Any:
    return admin_pb2.Instance(
        id=info.id,
        role=info.role.value,
        state=_STATE_TO_PROTO[info.state],
        endpoint=info.endpoint,
        model=info.model,
        block_size=info.block_size,
        capacity=info.capacity,
        in_flight=info.in_flight,
        load=info.load,
        launched=info.launched,
        detail=info.detail,
    )


def instance_from_proto(msg: Any) -> InstanceInfo:
    """The client side's conversion; raises ValueError on a state or role this build does not
    know (a newer server)."""
    state = _STATE_FROM_PROTO.get(msg.state)
    if state is None:
        raise ValueError(f"unknown instance state {msg.state}")
    return InstanceInfo(
        id=msg.id,
        role=WorkerRole(msg.role),
        state=state,
        endpoint=msg.endpoint,
        model=msg.model,
        block_size=msg.block_size,
        capacity=msg.capacity,
        in_flight=msg.in_flight,
        load=msg.load,
        launched=msg.launched,
        detail=msg.detail,
    )


def stats_to_proto(stats: ClusterStats) -> Any:
    msg = admin_pb2.StatsResponse(
        policy=stats.policy,
        instances=[instance_to_proto(i) for i in stats.instances],
        requests_total=stats.requests_total,
        requests_rejected=stats.requests_rejected,
        requests_failed_over=stats.requests_failed_over,
        extra=dict(stats.extra),
    )
    if stats.predictor_ttft_mape is not None:
        msg.predictor_ttft_mape = stats.predictor_ttft_mape
    if stats.predictor_tpot_mape is not None:
        msg.predictor_tpot_mape = stats.predictor_tpot_mape
    return msg


def stats_from_proto(msg: Any) -> ClusterStats:
    return ClusterStats(
        policy=msg.policy,
        instances=tuple(instance_from_proto(i) for i in msg.instances),
        requests_total=msg.requests_total,
        requests_rejected=msg.requests_rejected,
        requests_failed_over=msg.requests_failed_over,
        predictor_ttft_mape=(
            msg.predictor_ttft_mape if msg.HasField("predictor_ttft_mape") else None
        ),
        predictor_tpot_mape=(
            msg.predictor_tpot_mape if msg.HasField("predictor_tpot_mape") else None
        ),
        extra=dict(msg.extra),
    )


# -- authentication --------------------------------------------------------------------------


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


class _BearerTokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every Admin RPC without the right token before its handler runs; other services
    on the server (health) pass through."""

    _PREFIX = f"/{ADMIN_SERVICE_NAME}/"

    def __init__(self, token: str) -> None:
        self._token = token
        # Every Admin RPC is unary-unary, so one refusing handler fits all of them.
        self._deny_handler = grpc.unary_unary_rpc_method_handler(_deny)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        if not details.method.startswith(self._PREFIX):
            return await continuation(details)
        if token_matches(details.invocation_metadata or (), self._token):
            return await continuation(details)
        logger.warning("admin: refused %s (missing or wrong token)", details.method)
        return self._deny_handler


# -- the service -----------------------------------------------------------------------------

T = TypeVar("T")


class AdminService(admin_pb2_grpc.AdminServicer):
    """Admin RPCs → :class:`AdminBackend` calls, with argument checks and status codes."""

    def __init__(self, backend: AdminBackend) -> None:
        self._backend = backend

    async def _call(
        self,
        context: Any,
        rpc: str,
        work: Callable[[], Awaitable[T]],
        conflict: Any = grpc.StatusCode.FAILED_PRECONDITION,
    ) -> T:
        try:
            return await work()
        except InvalidAdminRequest as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except InstanceNotFound as exc:
            code, message = grpc.StatusCode.NOT_FOUND, str(exc)
        except InstanceConflict as exc:
            code, message = conflict, str(exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("admin: %s failed", rpc)
            code, message = grpc.StatusCode.INTERNAL, f"{rpc} failed; see the gateway log"
        await context.abort(code, message or code.name.lower())
        raise AssertionError("unreachable: context.abort raises")

    async def List(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            infos = sorted(self._backend.list_instances(), key=lambda i: i.id)
            return admin_pb2.ListResponse(instances=[instance_to_proto(i) for i in infos])

        return await self._call(context, "List", work)

    async def Add(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            role = _check_role(request.role, _ANY_ROLE, "Add")
            check_endpoint(request.endpoint)
            info = await self._backend.add_instance(role, request.endpoint)
            return admin_pb2.AddResponse(instance=instance_to_proto(info))

        return await self._call(context, "Add", work, conflict=grpc.StatusCode.ALREADY_EXISTS)

    async def Drain(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            info = await self._backend.drain(_check_id(request.id))
            return admin_pb2.DrainResponse(instance=instance_to_proto(info))

        return await self._call(context, "Drain", work)

    async def Remove(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            instance_id = _check_id(request.id)
            wait_s = request.wait_s if request.HasField("wait_s") else DEFAULT_REMOVE_WAIT_S
            await self._backend.remove(instance_id, wait_s=_check_wait_s(wait_s))
            return admin_pb2.RemoveResponse()

        return await self._call(context, "Remove", work)

    async def Scale(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            role = _check_role(request.role, _POOL_ROLES, "Scale")
            infos = await self._backend.scale(role, _check_replicas(request.replicas))
            ordered = sorted(infos, key=lambda i: i.id)
            return admin_pb2.ScaleResponse(instances=[instance_to_proto(i) for i in ordered])

        return await self._call(context, "Scale", work)

    async def SetRole(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            instance_id = _check_id(request.id)
            role = _check_role(request.role, _ANY_ROLE, "SetRole")
            info = await self._backend.set_role(instance_id, role)
            return admin_pb2.SetRoleResponse(instance=instance_to_proto(info))

        return await self._call(context, "SetRole", work)

    async def SetPolicy(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            self._backend.set_policy(_check_policy_name(request.name))
            return admin_pb2.SetPolicyResponse(policy=self._backend.stats().policy)

        return await self._call(context, "SetPolicy", work)

    async def Stats(self, request: Any, context: Any) -> Any:
        async def work() -> Any:
            stats = self._backend.stats()
            ordered = sorted(stats.instances, key=lambda i: i.id)
            return stats_to_proto(
                ClusterStats(
                    policy=stats.policy,
                    instances=tuple(ordered),
                    requests_total=stats.requests_total,
                    requests_rejected=stats.requests_rejected,
                    requests_failed_over=stats.requests_failed_over,
                    predictor_ttft_mape=stats.predictor_ttft_mape,
                    predictor_tpot_mape=stats.predictor_tpot_mape,
                    extra=stats.extra,
                )
            )

        return await self._call(context, "Stats", work)


# -- the server ------------------------------------------------------------------------------


class AdminServer:
    """The admin gRPC server of one gateway: the Admin service (token-checked) and the standard
    health service (``""`` and ``strata.admin.v1.Admin``), on one port."""

    _HEALTH_NAMES: Sequence[str] = ("", ADMIN_SERVICE_NAME)

    def __init__(self, config: AdminConfig, backend: AdminBackend) -> None:
        self.config = config
        self._backend = backend
        self._server: Any = None
        self._health: Any = None
        self.port: int | None = None
        """The bound port once started."""

    async def start(self) -> int:
        """Bind and serve (health NOT_SERVING until :meth:`set_ready`); returns the port.

        Raises :class:`AdminConfigError` when the address cannot be bound."""
        if self._server is not None:
            raise RuntimeError("admin server already started")
        interceptors = []
        if self.config.token is not None:
            interceptors.append(_BearerTokenInterceptor(self.config.token))
        else:
            logger.warning(
                "admin API on %s WITHOUT authentication (allow_unauthenticated, loopback only)",
                self.config.host,
            )
        # SO_REUSEPORT is gRPC's default; without turning it off a second gateway could bind
        # the same admin port and silently take half of the calls.
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        service = AdminService(self._backend)
        admin_pb2_grpc.add_AdminServicer_to_server(service, server)  # type: ignore[no-untyped-call]
        self._health = health.aio.HealthServicer()
        for name in self._HEALTH_NAMES:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = format_endpoint(self.config.host, self.config.port)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise AdminConfigError(f"cannot bind the admin API to {address}: {exc}") from exc
        if port == 0:
            raise AdminConfigError(f"cannot bind the admin API to {address}")
        await server.start()
        self._server = server
        self.port = int(port)
        print(
            f"strata admin listening on {format_endpoint(self.config.host, self.port)}",
            flush=True,
        )
        return self.port

    async def set_ready(self, ready: bool) -> None:
        """Health reports SERVING while the gateway is ready (takes traffic), else NOT_SERVING."""
        if self._health is None:
            raise RuntimeError("admin server not started")
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self._HEALTH_NAMES:
            await self._health.set(name, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Health goes NOT_SERVING for good; in-flight calls get ``grace_s`` to finish."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await server.stop(grace_s)
