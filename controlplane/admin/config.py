"""Where the admin API listens and how it authenticates: :class:`AdminConfig` (the server's,
validated on construction: a token, or loopback with ``allow_unauthenticated``) and
:class:`AdminApiConfig` (the gateway's ``--admin-*`` options, off unless a port is set).

The expected token comes from the config or else the ``STRATA_ADMIN_TOKEN`` environment variable;
it must be at least :data:`MIN_TOKEN_CHARS` characters. Without one the server refuses to start
(:class:`AdminConfigError`), unless ``allow_unauthenticated=True`` *and* the bind address is
loopback.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from strata_common.options import option
from strata_common.tls import TlsConfig, is_loopback

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
    "read_token_file",
]

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


class AdminConfigError(ValueError):
    """The admin service cannot start with this configuration."""


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
    cluster_key: bytes | None = field(default=None, repr=False)
    """Secret mode: callers proving ``admin/NAME`` with the cluster key are let in too."""
    tls: TlsConfig | None = None
    """TLS mode: serve mutual TLS under the cluster CA; a caller whose certificate names role
    ``admin`` is let in without the token (docs/design/security.md §5.1)."""

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
        elif self.has_cluster_auth:
            if self.allow_unauthenticated:
                raise AdminConfigError(
                    "cluster credentials are set and allow_unauthenticated is on: choose one"
                )
        elif not self.allow_unauthenticated:
            raise AdminConfigError(
                f"no admin token: set {ADMIN_TOKEN_ENV} (or the admin token in the gateway "
                "config), or give cluster credentials (role admin); to serve without either, "
                "bind to loopback and set allow_unauthenticated"
            )
        elif not is_loopback(self.host):
            raise AdminConfigError(
                f"refusing to serve the admin API without a token on {self.host}: "
                "allow_unauthenticated is only allowed on a loopback address"
            )

    @property
    def requires_token(self) -> bool:
        return self.token is not None

    @property
    def has_cluster_auth(self) -> bool:
        """Whether callers of role ``admin`` (cluster credentials) are let in."""
        return self.cluster_key is not None or (self.tls is not None and self.tls.enabled)

    @classmethod
    def resolve(
        cls,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_ADMIN_PORT,
        token: str | None = None,
        allow_unauthenticated: bool = False,
        environ: Mapping[str, str] | None = None,
        cluster_key: bytes | None = None,
        tls: TlsConfig | None = None,
    ) -> AdminConfig:
        """The config's own token wins; else ``STRATA_ADMIN_TOKEN`` (an empty value counts as
        unset); else none (which needs ``allow_unauthenticated``)."""
        env = os.environ if environ is None else environ
        if not token:
            token = env.get(ADMIN_TOKEN_ENV) or None
        return cls(
            host=host,
            port=port,
            token=token,
            allow_unauthenticated=allow_unauthenticated,
            cluster_key=cluster_key,
            tls=tls,
        )


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

    def server_config(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        cluster_key: bytes | None = None,
        tls: TlsConfig | None = None,
    ) -> AdminConfig | None:
        """The admin server's config (None while the API is off); the token is this config's,
        else ``$STRATA_ADMIN_TOKEN``; callers of role ``admin`` are let in too with the gateway's
        cluster credentials (``cluster_key``, ``tls``). Raises :class:`AdminConfigError` when
        nothing is usable."""
        if self.port is None:
            return None
        return AdminConfig.resolve(
            host=self.host,
            port=self.port,
            token=self.token or None,
            environ=environ,
            cluster_key=cluster_key,
            tls=tls if tls is not None and tls.enabled else None,
        )
