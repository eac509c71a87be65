"""The gateway's configuration: one frozen dataclass per component, the gateway's composed of them.

Each component's config declares its command-line options on its own fields
(:mod:`strata_common.options`); :class:`GatewayConfig` holds one group per component, so the flags
of ``python -m controlplane.gateway`` and their ``STRATA_GATEWAY_*`` environment variables are
derived from these fields alone (``--help`` lists them; the command line wins over the
environment):

* :class:`GatewayConfig` itself: ``--model-dir``, ``--served-model-name``, ``--prefill``,
  ``--decode``;
* ``http``: :class:`HttpConfig` (``--host``, ``--port``, ``--request-timeout``, the limits on
  what a client may send and hold: ``--max-request-body-bytes``, ``--read-timeout``, ...);
* ``registry``: :class:`RegistryConfig` (``--registry``, ``--health-check-interval``, ...);
* ``routing``: :class:`RoutingConfig` (``--policy``, ``--kv-metadata``);
* ``scheduling``: :class:`~controlplane.scheduling.SchedulingConfig` (``--ttft-slo``, ...);
* ``profiling``: :class:`~controlplane.workers.profiling.ProfileSettings` (``--no-profile``, ...);
* ``admin``: :class:`~controlplane.admin.config.AdminApiConfig` (``--admin-port``, ...);
* ``launch``: :class:`~controlplane.launch.launcher.LaunchConfig` (``--launch-store``, ...);
* ``k8s``: :class:`~controlplane.launch.kubernetes_config.KubernetesConfig`
  (``--k8s-namespace``, ...);
* ``cluster``: :class:`ClusterConfig` (``--cluster-key-file``).

Every config is validated on construction (``ValueError``; :class:`ConfigError` here), so a
gateway never starts half-configured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.admin.config import AdminApiConfig
from controlplane.api.sampling import (
    DEFAULT_MAX_CHARS_PER_TOKEN,
    DEFAULT_MAX_STOP_CHARS,
    DEFAULT_MAX_STOP_STRINGS,
)
from controlplane.launch.kubernetes_config import KubernetesConfig
from controlplane.launch.launcher import LaunchConfig
from controlplane.launch.planner import PlannerSettings
from controlplane.scheduling.policies import PolicyKind
from controlplane.scheduling.types import SchedulingConfig
from controlplane.tenants import ApiKeys, TenantError
from controlplane.workers.profiling import ProfileSettings
from kvstore.metadata import parse_metadata_spec
from strata_common.credentials import CredentialError, Identity, read_cluster_key
from strata_common.endpoints import format_endpoint, parse_endpoint
from strata_common.grpc_auth import ClientAuth
from strata_common.options import from_cli, group, option
from strata_common.secrets import redact_url
from strata_common.tls import (
    INSECURE_HELP,
    TLS_FLAGS,
    TlsConfig,
    check_listen,
    insecure_warning,
)
from strata_common.units import parse_duration, parse_size

__all__ = [
    "ENV_PREFIX",
    "ClusterConfig",
    "ConfigError",
    "GatewayConfig",
    "HttpConfig",
    "RegistryConfig",
    "RoutingConfig",
    "parse_endpoints",
]

ENV_PREFIX = "STRATA_GATEWAY_"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def parse_endpoints(text: str) -> tuple[str, ...]:
    """``"a:1,b:2"`` → ``("a:1", "b:2")``, each a valid ``HOST:PORT`` (IPv6 in brackets)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    return tuple(str(parse_endpoint(part)) for part in parts)


def _workers_option(role: str) -> Any:
    """The ``--<role> HOST:PORT`` option (repeatable, or comma-separated) of a worker pool."""
    return option(
        (),
        flag=role,
        parse=parse_endpoints,
        repeat=True,
        metavar="HOST:PORT",
        help=f"{role} worker HOST:PORT",
    )


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The OpenAI-compatible HTTP server (controlplane/gateway.py) and what it accepts.

    Every resource a client can make the gateway spend is bounded; the defaults and why are in
    docs/design/gateway.md §5 ("Limits"): the body (1 MiB), stop strings (4 of at most 256
    characters), a prompt's characters before it is tokenized, the threads that tokenize, the
    time a request's head and body may take to arrive and a response may wait for its client
    to read, and the number of open connections.
    """

    host: str = option("127.0.0.1", help="address the HTTP API listens on")
    port: int = option(8000, help="HTTP port (0 = any free port; the listening line says which)")
    request_timeout_s: float = option(
        600.0,
        parse=parse_duration,
        help="deadline of a whole request (prefill plus decode), enforced as gRPC deadlines",
    )
    max_request_body_bytes: int = option(
        1024 * 1024,
        flag="max-request-body-bytes",
        parse=parse_size,
        help="largest request body; a larger one gets 413",
    )
    max_stop_strings: int = option(
        DEFAULT_MAX_STOP_STRINGS, help="most strings a request's `stop` may hold (400 beyond)"
    )
    max_stop_chars: int = option(
        DEFAULT_MAX_STOP_CHARS, help="longest stop string, in characters (400 beyond)"
    )
    max_chars_per_token: int = option(
        DEFAULT_MAX_CHARS_PER_TOKEN,
        help="a prompt longer than (max_model_len - 1) × this many characters (or the longest "
        "token of the vocabulary, if shorter) is refused with 400 before it is tokenized",
    )
    tokenizer_threads: int = option(
        4, help="threads that tokenize prompts off the event loop (at most this many at once)"
    )
    read_timeout_s: float = option(
        60.0,
        parse=parse_duration,
        help="a request's head must arrive within this long of the connection opening or of its "
        "previous response (so idle keep-alive connections close after it), and its body within "
        "this long of the head (408)",
    )
    write_timeout_s: float = option(
        30.0,
        parse=parse_duration,
        help="a response the client does not read for this long (TCP zero window, unacknowledged "
        "data, or the send buffer staying full) is aborted and its request cancelled",
    )
    max_connections: int = option(
        2048, help="open HTTP connections; one more is answered 503 and closed"
    )
    health_details: bool = option(
        False,
        help="/health also lists each instance's endpoint, load and why it is down (internal "
        "addresses: only where every HTTP client is trusted; `strata admin list` shows them "
        "behind the admin token)",
    )
    shutdown_grace_s: float = option(
        10.0,
        parse=parse_duration,
        help="on SIGTERM/SIGINT: stop accepting, then give in-flight requests this long",
    )
    api_keys: tuple[str, ...] = option(
        (),
        flag="api-key",
        repeat=True,
        repr=False,
        help="an API key the /v1 routes accept, its own tenant (repeatable; a command line is "
        "readable by local users: prefer the environment or --api-keys-file)",
    )
    api_keys_file: Path | None = option(
        None, help="API keys and their tenants, `KEY TENANT` per line (a 0600 file)"
    )
    api_keys_redis: str = option(
        "",
        metavar="URL",
        help="also the API keys in the Redis hash strata:api-keys (`strata tenants add`; MAC'd "
        "with the cluster key): redis://HOST:PORT/DB, rediss://, unix://",
    )
    api_keys_refresh_s: float = option(
        10.0,
        parse=parse_duration,
        help="how often the keys of --api-keys-redis are read again (a removed key stops "
        "working within this)",
    )

    def api_key_table(self) -> ApiKeys:
        """The API keys to tenants (docs/design/security.md §6.1); empty: keys not required."""
        try:
            return ApiKeys.load(self.api_keys, self.api_keys_file)
        except TenantError as exc:
            raise ConfigError(str(exc)) from None

    def __post_init__(self) -> None:
        self.api_key_table()  # a bad key or file fails at start-up, naming it
        if not self.host:
            raise ConfigError("host must be non-empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} must be in 0..65535")
        for name in (
            "request_timeout_s",
            "read_timeout_s",
            "write_timeout_s",
            "api_keys_refresh_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.api_keys_redis and not self.api_keys_redis.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                f"api_keys_redis {redact_url(self.api_keys_redis)!r} must be a redis://, "
                "rediss:// or unix:// URL"
            )
        if self.max_request_body_bytes < 1024:
            raise ConfigError(
                f"max_request_body_bytes must be >= 1024, got {self.max_request_body_bytes}"
            )
        for name in (
            "max_stop_strings",
            "max_stop_chars",
            "max_chars_per_token",
            "tokenizer_threads",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """The instance registry: where its records live and how instances are watched."""

    url: str = option(
        "",
        flag="registry",
        metavar="URL",
        help='where instance records live: "" = this process; redis://HOST:PORT/DB (or '
        "rediss://, unix://) = shared with every gateway using the same URL",
    )
    worker_startup_timeout_s: float = option(
        600.0, parse=parse_duration, help="how long start-up waits for every worker to be ready"
    )
    health_check_interval_s: float = option(
        2.0, parse=parse_duration, help="period of the Health polls that drive worker selection"
    )
    health_check_timeout_s: float = option(2.0, parse=parse_duration, help="one Health poll")
    stall_floor_s: float = option(
        15.0,
        parse=parse_duration,
        help="least time a worker's engine may have work without completing a step, or leave "
        "Health unanswered, before it is marked dead and its requests fail over (the bound is "
        "max(this, stall_factor × its longest predicted step))",
    )
    stall_factor: float = option(
        4.0,
        help="stall bound = max(stall_floor, this × the longest engine step the worker's "
        "latency model predicts for its load)",
    )
    drain_timeout_s: float = option(
        60.0,
        parse=parse_duration,
        help="how long scale-down and set-role wait for a drained worker's requests",
    )
    announcement_grace_s: float = option(
        10.0,
        parse=parse_duration,
        help="how long a worker's announcement may be missing from the registry before its "
        "instance is drained and removed (at least the workers' --announce-ttl)",
    )

    def __post_init__(self) -> None:
        for name in (
            "worker_startup_timeout_s",
            "health_check_interval_s",
            "health_check_timeout_s",
            "drain_timeout_s",
            "announcement_grace_s",
            "stall_floor_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.stall_factor >= 1:
            raise ConfigError(f"stall_factor must be >= 1, got {self.stall_factor}")
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"registry_url {redact_url(self.url)!r} must be empty (this process) or a "
                "redis://, rediss:// or unix:// URL"
            )


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Which policy routes requests, and where the prefix index's events come from."""

    policy: PolicyKind = option(
        PolicyKind.SLO_AWARE,
        help="scheduling policy at start (`strata admin policy NAME` changes it at run time)",
    )
    kv_metadata: str = option(
        "",
        metavar="SPEC",
        help="metadata store feeding the prefix index (strata://HOST:PORT or redis://...); "
        '"" = no prefix information',
    )

    def __post_init__(self) -> None:
        if self.kv_metadata:
            try:
                parse_metadata_spec(self.kv_metadata)
            except ValueError as exc:
                raise ConfigError(f"kv_metadata: {exc}") from None


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The gateway's cluster credentials (docs/design/security.md §3.2, §5.1).

    With a key file, the gateway calls workers and the store node's metadata service as
    ``gateway/HOST:PORT`` (its HTTP address as configured: the NAME of a gateway), and its
    launcher passes the file to the workers it starts. Without one (the default) nothing is
    authenticated: a loopback development setup."""

    key_file: Path | None = option(
        None,
        help="the cluster key (0600 file) for calls to workers and the KV metadata, passed on "
        "to launched workers; none = no authentication (loopback only)",
    )

    def __post_init__(self) -> None:
        if self.key_file is not None:
            try:
                read_cluster_key(self.key_file)
            except CredentialError as exc:
                raise ConfigError(str(exc)) from None

    def key(self) -> bytes | None:
        """The cluster key (None without a key file)."""
        return None if self.key_file is None else read_cluster_key(self.key_file)

    def client_auth(self, name: str) -> ClientAuth | None:
        """Credentials of ``gateway/NAME`` (None without a key file)."""
        if self.key_file is None:
            return None
        return ClientAuth(read_cluster_key(self.key_file), Identity("gateway", name))


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything the gateway process needs; invalid values raise ValueError at construction."""

    model_dir: Path = option(help="HF model directory: tokenizer, chat template, generation config")
    served_model_name: str = option(
        "", help="the model name clients send and the gateway reports (default: the dir's name)"
    )
    prefill_endpoints: tuple[str, ...] = _workers_option("prefill")
    decode_endpoints: tuple[str, ...] = _workers_option("decode")
    http: HttpConfig = group(HttpConfig, title="HTTP API")
    registry: RegistryConfig = group(RegistryConfig, title="instance registry")
    routing: RoutingConfig = group(RoutingConfig, title="routing (docs/design/scheduling.md)")
    scheduling: SchedulingConfig = group(
        SchedulingConfig,
        title="scheduling policies",
        default=SchedulingConfig(local_prefill_threshold_tokens=0),
    )
    profiling: ProfileSettings = group(
        ProfileSettings, title="start-up profile of each worker", prefix="profile-"
    )
    admin: AdminApiConfig = group(
        AdminApiConfig, title="admin API (`strata admin`)", prefix="admin-"
    )
    launch: LaunchConfig = group(
        LaunchConfig, title="launcher (workers started by this gateway)", prefix="launch-"
    )
    k8s: KubernetesConfig = group(
        KubernetesConfig,
        title="Kubernetes launcher (scale the prefill and decode Deployments; "
        "docs/design/multihost.md §7)",
        prefix="k8s-",
    )
    cluster: ClusterConfig = group(
        ClusterConfig, title="cluster credentials (docs/design/security.md)", prefix="cluster-"
    )
    planner: PlannerSettings = group(
        PlannerSettings,
        title="P:D planner (resizes the launched pools; docs/design/planner.md)",
        prefix="planner-",
    )
    insecure: bool = option(False, help=INSECURE_HELP)
    tls: TlsConfig = group(
        TlsConfig, title="TLS mode (docs/design/security.md §3.1)", prefix="tls-"
    )

    def __post_init__(self) -> None:
        http = self.http
        if (http.api_keys or http.api_keys_file or http.api_keys_redis) and (
            self.cluster.key_file is None
        ):
            # Without it, a tenant's namespace is computable from its name alone.
            raise ConfigError("API keys need the cluster key (--cluster-key-file)")
        try:
            check_listen(
                self.http.host,
                "--host",
                secured=self.has_api_keys,
                insecure=self.insecure,
                needs="API keys (--api-key or --api-keys-file, with --cluster-key-file)",
            )
            if self.admin.port is not None:
                check_listen(
                    self.admin.host,
                    "--admin-host",
                    secured=self.tls.enabled,
                    insecure=self.insecure,
                    needs=TLS_FLAGS,
                )
            if self.tls.enabled:
                self.tls.check_role("gateway")
        except CredentialError as exc:
            raise ConfigError(str(exc)) from None
        slos = (self.scheduling.default_ttft_slo_s, self.scheduling.default_tpot_slo_s)
        if self.planner.enabled and None in slos:
            raise ConfigError("--planner sizes the pools for SLOs: give --ttft-slo and --tpot-slo")
        if self.tls.enabled and (self.launch.prefill or self.launch.decode):
            # A launched worker would need a certificate of its own (worker/INSTANCE_ID).
            raise ConfigError(
                "TLS mode does not launch workers: start each with its own certificate "
                "(--tls-cert/--tls-key/--tls-ca) and name them (--prefill/--decode)"
            )
        if self.k8s.enabled and self.launch.enabled:
            raise ConfigError(
                "--k8s-namespace (scale Kubernetes Deployments) and --launch-store (start local "
                "worker processes) exclude each other: give one launcher"
            )
        if not self.model_dir.is_dir():
            raise ConfigError(f"model_dir {str(self.model_dir)!r} is not a directory")
        if not self.served_model_name:
            object.__setattr__(self, "served_model_name", self.model_dir.resolve().name)
        if any(c.isspace() for c in self.served_model_name):
            raise ConfigError(
                f"served_model_name {self.served_model_name!r} must be non-empty, no whitespace"
            )
        for name, launched, flag in (
            ("prefill_endpoints", self.launch.prefill, "launch_prefill"),
            ("decode_endpoints", self.launch.decode, "launch_decode"),
        ):
            if not getattr(self, name) and launched == 0 and not self.registry.url:
                # With a shared registry, workers may come from it alone: announced
                # (docs/design/multihost.md §3), added, or other gateways' records.
                raise ConfigError(
                    f"{name} must name at least one HOST:PORT (or set {flag}, or share a "
                    "registry where workers announce themselves: --registry)"
                )
            for endpoint in getattr(self, name):
                try:
                    parse_endpoint(endpoint)
                except ValueError as exc:
                    raise ConfigError(f"{name}: {exc}") from None

    @property
    def has_api_keys(self) -> bool:
        return bool(self.http.api_keys or self.http.api_keys_file or self.http.api_keys_redis)

    def insecure_warnings(self) -> list[str]:
        """What the gateway logs at every start when ``--insecure`` lets it listen on a
        non-loopback address without credentials (docs/design/security.md §7)."""
        warnings = [
            insecure_warning(
                self.http.host, "the HTTP API", secured=self.has_api_keys, insecure=self.insecure
            )
        ]
        if self.admin.port is not None:
            warnings.append(
                insecure_warning(
                    self.admin.host,
                    "the admin API",
                    secured=self.tls.enabled,
                    insecure=self.insecure,
                    keyed=self.cluster.key_file is not None,
                )
            )
        return [w for w in warnings if w is not None]

    def client_auth(self) -> ClientAuth | None:
        """This gateway's credentials for calls to workers and the KV metadata: its certificate
        in TLS mode, ``gateway/HOST:PORT`` and the cluster key in secret mode, else None."""
        if self.tls.enabled:
            return ClientAuth.from_tls(self.tls, "gateway", self.cluster.key())
        return self.cluster.client_auth(self.cluster_name)

    @property
    def cluster_name(self) -> str:
        """This gateway's NAME in the cluster: its HTTP ``HOST:PORT`` as configured."""
        return format_endpoint(self.http.host, self.http.port)

    @classmethod
    def from_argv(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> GatewayConfig:
        """Build from command-line flags over ``STRATA_GATEWAY_*`` variables; exits with status 2
        on a bad flag or value."""
        return from_cli(
            cls,
            argv,
            env_prefix=ENV_PREFIX,
            environ=environ,
            prog="python -m controlplane.gateway",
            description="Strata gateway: OpenAI-compatible HTTP before prefill/decode workers.",
        )
