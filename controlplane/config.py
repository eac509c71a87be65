"""Gateway configuration: one frozen dataclass, validated on construction, built from the CLI.

`GatewayConfig.from_argv(argv)` is the only place command-line flags are declared; every flag maps
to one field of the same name, so the field list below is the complete set of knobs.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from kvstore.metadata import parse_metadata_spec

__all__ = ["ConfigError", "GatewayConfig", "parse_duration_s", "parse_endpoint"]

_DURATION_UNITS_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_ENDPOINT_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def parse_duration_s(value: str | float) -> float:
    """Parse "30s", "500ms", "5m", "1h" or a bare number of seconds into seconds."""
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION_RE.match(value)
    if match is None:
        raise ConfigError(f"invalid duration {value!r}: expected e.g. '30s', '500ms', '5m', '1h'")
    return float(match.group(1)) * _DURATION_UNITS_S[match.group(2) or "s"]


def parse_endpoint(value: str) -> str:
    """Validate a gRPC endpoint "host:port" (IPv6 hosts in brackets) and return it unchanged."""
    match = _ENDPOINT_RE.match(value.strip())
    if match is None:
        raise ConfigError(f"invalid endpoint {value!r}: expected HOST:PORT")
    port = int(match.group(2))
    if not 1 <= port <= 65535:
        raise ConfigError(f"invalid endpoint {value!r}: port must be in 1..65535")
    return value.strip()


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything the gateway process needs; invalid values raise ConfigError at construction."""

    model_dir: Path
    """HF model directory: the gateway reads its tokenizer, chat template, generation config."""
    served_model_name: str
    """The `model` name clients must send and the gateway reports."""
    prefill_endpoints: tuple[str, ...]
    """gRPC endpoints (HOST:PORT) of prefill workers; the policy picks among them."""
    decode_endpoints: tuple[str, ...]
    """gRPC endpoints (HOST:PORT) of decode workers; the policy picks among them."""
    host: str = "127.0.0.1"
    port: int = 8000
    """HTTP port; 0 picks a free port (the listening line reports the real one)."""
    request_timeout_s: float = 600.0
    """Deadline for a whole request (prefill plus decode), enforced as gRPC deadlines."""
    worker_startup_timeout_s: float = 600.0
    """How long start-up waits for every worker to be ready (vLLM on CPU compiles for ~1 min)."""
    health_check_interval_s: float = 2.0
    """Period of the background Health polls that drive /health and worker selection."""
    health_check_timeout_s: float = 2.0
    max_request_body_bytes: int = 16 * 1024 * 1024
    shutdown_grace_s: float = 10.0
    """On SIGTERM/SIGINT: stop accepting, then give in-flight requests this long to finish."""
    registry_url: str = ""
    """Where instance records live: "" = this process; redis://HOST:PORT/DB (or rediss://,
    unix://) = shared with every gateway using the same URL (high availability)."""
    drain_timeout_s: float = 60.0
    """How long scale-down and set-role wait for a drained worker's requests before stopping it."""

    # -- admin API (controlplane/admin.py) --
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    """Port of the admin gRPC API; None = no admin API, 0 = any free port (printed)."""
    admin_token: str = field(default="", repr=False)
    """The admin API's bearer token; "" = the STRATA_ADMIN_TOKEN environment variable. Needed
    whenever the admin API is on (at least 16 characters)."""

    # -- local-process launcher (controlplane/launcher.py), for `scale` and `set-role` --
    launch_store: str = ""
    """Store node (HOST:PORT) of the workers this gateway launches; "" = no launcher."""
    launch_prefill: int = 0
    """Prefill workers to launch at start-up (before the configured ones are registered; they
    are waited for like configured ones, and `scale` may stop them)."""
    launch_decode: int = 0
    """Decode workers to launch at start-up (as launch_prefill)."""
    launch_kv_metadata: str = ""
    """The launched workers' --kv-metadata (e.g. strata://HOST:PORT); "" = none."""
    launch_kv_cache_size: str = "1GiB"
    launch_max_model_len: int | None = None
    launch_worker_args: tuple[str, ...] = ()
    """More `strata worker` arguments for launched workers, e.g. ("--max-num-seqs", "8")."""
    launch_cores_per_engine: int = 1
    launch_cpus: tuple[int, ...] | None = None
    """CPU cores the launched engines are pinned to; None = this process's affinity set."""
    launch_log_dir: Path | None = None
    """Launched workers' output goes to LOG_DIR/{role}-{port}.log; None = this process's stdout."""

    # -- routing (controlplane/routing.py; docs/design/scheduling.md) --
    policy: str = "slo_aware"
    """Scheduling policy at start: round_robin, least_loaded, prefix_aware or slo_aware
    (`strata admin policy NAME` changes it at run time)."""
    kv_metadata: str = ""
    """Metadata store whose event stream feeds the prefix index (strata://HOST:PORT, redis://...);
    "" = no prefix information (policies still work, as if nothing were cached)."""
    ttft_slo_s: float | None = None
    """Default TTFT SLO (a request's x-strata-ttft-slo-ms header overrides it); None = none."""
    tpot_slo_s: float | None = None
    """Default time-per-output-token SLO (x-strata-tpot-slo-ms overrides it); None = none."""
    local_prefill_threshold_tokens: int = 0
    """Conditional disaggregation: a prompt with fewer uncached tokens on the chosen decode
    instance is prefilled there (0 = only prompts resident in its HBM, or no prefill ready)."""
    conditional_disaggregation: bool = True
    profile_workers: bool = True
    """Time a short profile on each worker that becomes ready (calibrates its latency model)."""
    profile_max_model_len: int = 1024
    """Longest prompt + output the profile uses (caps its cost on big contexts)."""
    profile_max_batch: int = 8
    profile_repeats: int = 1
    profile_budget_s: float = 40.0
    """Wall-clock bound of each worker's start-up profile (waits for client requests included);
    points that would not fit are skipped (controlplane/profiling.py)."""
    profile_max_step_s: float = 2.0
    """Longest predicted call of the profile: longer points are skipped, so no client request
    waits behind the profile for longer."""

    def __post_init__(self) -> None:
        if not self.model_dir.is_dir():
            raise ConfigError(f"model_dir {str(self.model_dir)!r} is not a directory")
        if not self.served_model_name or any(c.isspace() for c in self.served_model_name):
            raise ConfigError(
                f"served_model_name {self.served_model_name!r} must be non-empty, no whitespace"
            )
        for name, launch in (
            ("prefill_endpoints", "launch_prefill"),
            ("decode_endpoints", "launch_decode"),
        ):
            endpoints = getattr(self, name)
            if not endpoints and getattr(self, launch) == 0:
                raise ConfigError(f"{name} must name at least one HOST:PORT (or set {launch})")
            for endpoint in endpoints:
                parse_endpoint(endpoint)
        self._check_admin_and_launcher()
        self._check_routing()
        if not self.host:
            raise ConfigError("host must be non-empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} must be in 0..65535")
        for name in (
            "request_timeout_s",
            "worker_startup_timeout_s",
            "health_check_interval_s",
            "health_check_timeout_s",
            "drain_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.registry_url and not self.registry_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                f"registry_url {self.registry_url!r} must be empty (this process) or a "
                "redis://, rediss:// or unix:// URL"
            )
        if self.max_request_body_bytes < 1024:
            raise ConfigError(
                f"max_request_body_bytes must be >= 1024, got {self.max_request_body_bytes}"
            )

    def _check_routing(self) -> None:
        from controlplane.scheduling.policy import POLICY_NAMES

        if self.policy not in POLICY_NAMES:
            raise ConfigError(
                f"unknown policy {self.policy!r}; choose one of {', '.join(POLICY_NAMES)}"
            )
        for name in ("kv_metadata", "launch_kv_metadata"):
            spec = getattr(self, name)
            if spec:
                try:
                    parse_metadata_spec(spec)
                except ValueError as exc:
                    raise ConfigError(f"{name}: {exc}") from None
        for name in ("ttft_slo_s", "tpot_slo_s"):
            slo = getattr(self, name)
            if slo is not None and not slo > 0:
                raise ConfigError(f"{name} must be > 0, got {slo}")
        if self.local_prefill_threshold_tokens < 0:
            raise ConfigError("local_prefill_threshold_tokens must be >= 0")
        if self.profile_max_model_len < 4 or self.profile_max_batch < 1 or self.profile_repeats < 1:
            raise ConfigError(
                "need profile_max_model_len >= 4, profile_max_batch >= 1, profile_repeats >= 1"
            )
        if not (self.profile_budget_s > 0 and self.profile_max_step_s > 0):
            raise ConfigError("profile_budget_s and profile_max_step_s must be > 0")

    def _check_admin_and_launcher(self) -> None:
        if self.admin_port is not None and not 0 <= self.admin_port <= 65535:
            raise ConfigError(f"admin_port {self.admin_port} must be in 0..65535")
        if not self.admin_host:
            raise ConfigError("admin_host must be non-empty")
        if self.launch_store:
            parse_endpoint(self.launch_store)
        for name in ("launch_prefill", "launch_decode"):
            count = getattr(self, name)
            if count < 0:
                raise ConfigError(f"{name} must be >= 0, got {count}")
            if count and not self.launch_store:
                raise ConfigError(f"{name} needs launch_store (the launched workers' store node)")
        if self.launch_cores_per_engine < 1:
            raise ConfigError(
                f"launch_cores_per_engine must be >= 1, got {self.launch_cores_per_engine}"
            )
        if self.launch_cpus is not None and (
            not self.launch_cpus or any(cpu < 0 for cpu in self.launch_cpus)
        ):
            raise ConfigError(f"launch_cpus must be non-negative core ids, got {self.launch_cpus}")
        if self.launch_max_model_len is not None and self.launch_max_model_len < 2:
            raise ConfigError(f"launch_max_model_len must be >= 2, got {self.launch_max_model_len}")

    @property
    def launcher_enabled(self) -> bool:
        """True when the gateway can start workers (`scale`, `set-role`, launch_prefill/decode)."""
        return bool(self.launch_store)

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None = None) -> GatewayConfig:
        """Build from command-line flags; argparse exits with status 2 on a bad flag or value."""
        parser = _build_parser()
        args = parser.parse_args(argv)
        try:
            model_dir = Path(args.model_dir)
            return cls(
                model_dir=model_dir,
                served_model_name=args.served_model_name or model_dir.resolve().name,
                prefill_endpoints=tuple(_split_endpoints(args.prefill or [])),
                decode_endpoints=tuple(_split_endpoints(args.decode or [])),
                host=args.host,
                port=args.port,
                request_timeout_s=parse_duration_s(args.request_timeout),
                worker_startup_timeout_s=parse_duration_s(args.worker_startup_timeout),
                health_check_interval_s=parse_duration_s(args.health_check_interval),
                health_check_timeout_s=parse_duration_s(args.health_check_timeout),
                max_request_body_bytes=args.max_request_body_bytes,
                shutdown_grace_s=parse_duration_s(args.shutdown_grace),
                registry_url=args.registry,
                drain_timeout_s=parse_duration_s(args.drain_timeout),
                policy=args.policy,
                kv_metadata=args.kv_metadata,
                ttft_slo_s=_optional_duration_s(args.ttft_slo),
                tpot_slo_s=_optional_duration_s(args.tpot_slo),
                local_prefill_threshold_tokens=args.local_prefill_threshold,
                conditional_disaggregation=not args.no_conditional_disaggregation,
                profile_workers=not args.no_profile,
                profile_budget_s=parse_duration_s(args.profile_budget),
                profile_max_step_s=parse_duration_s(args.profile_max_step),
                admin_host=args.admin_host,
                admin_port=args.admin_port,
                admin_token=_read_token_file(args.admin_token_file),
                launch_store=args.launch_store,
                launch_prefill=args.launch_prefill,
                launch_decode=args.launch_decode,
                launch_kv_metadata=args.launch_kv_metadata,
                launch_kv_cache_size=args.launch_kv_cache_size,
                launch_max_model_len=args.launch_max_model_len,
                launch_worker_args=tuple(shlex.split(args.launch_worker_args)),
                launch_cores_per_engine=args.launch_cores_per_engine,
                launch_cpus=_parse_cpus(args.launch_cpus),
                launch_log_dir=Path(args.launch_log_dir) if args.launch_log_dir else None,
            )
        except (ConfigError, ValueError) as exc:
            parser.error(str(exc))  # exits with status 2


def _optional_duration_s(value: str) -> float | None:
    return parse_duration_s(value) if value else None


def _split_endpoints(values: list[str]) -> list[str]:
    """`--prefill a:1 --prefill b:2` and `--prefill a:1,b:2` mean the same."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _read_token_file(path: str | None) -> str:
    """The admin token kept in a file (first line, surrounding whitespace dropped): a token on
    the command line would be visible to every user in `ps`."""
    if not path:
        return ""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the admin token file {path!r}: {exc}") from None
    token = text.strip()
    if not token or "\n" in token:
        raise ConfigError(f"admin token file {path!r} must hold one non-empty line")
    return token


def _parse_cpus(text: str | None) -> tuple[int, ...] | None:
    """ "0,1,4-7" -> (0, 1, 4, 5, 6, 7); None or "" -> None (this process's affinity set)."""
    if not text:
        return None
    cpus: list[int] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ConfigError(f"invalid core list {text!r}: expected e.g. '0,1' or '0-3'")
        cpus += range(int(first), int(last if sep else first) + 1)
    return tuple(sorted(set(cpus)))


def _default(name: str) -> object:
    # slots=True turns the class attributes into slot descriptors, so read defaults from fields().
    for f in fields(GatewayConfig):
        if f.name == name and f.default is not MISSING:
            return f.default
    raise KeyError(name)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m controlplane.gateway",
        description="Strata gateway: OpenAI-compatible HTTP in front of prefill/decode workers.",
    )
    parser.add_argument("--model-dir", required=True, help="HF model directory (tokenizer)")
    parser.add_argument(
        "--served-model-name", default="", help="model name for clients (default: dir name)"
    )
    parser.add_argument("--prefill", action="append", help="prefill worker HOST:PORT (repeatable)")
    parser.add_argument("--decode", action="append", help="decode worker HOST:PORT (repeatable)")
    parser.add_argument("--host", default=_default("host"))
    parser.add_argument("--port", type=int, default=_default("port"))
    parser.add_argument("--request-timeout", default=f"{_default('request_timeout_s')}s")
    parser.add_argument(
        "--worker-startup-timeout", default=f"{_default('worker_startup_timeout_s')}s"
    )
    parser.add_argument(
        "--health-check-interval", default=f"{_default('health_check_interval_s')}s"
    )
    parser.add_argument("--health-check-timeout", default=f"{_default('health_check_timeout_s')}s")
    parser.add_argument(
        "--max-request-body-bytes", type=int, default=_default("max_request_body_bytes")
    )
    parser.add_argument("--shutdown-grace", default=f"{_default('shutdown_grace_s')}s")
    parser.add_argument(
        "--registry",
        default=_default("registry_url"),
        help="redis://HOST:PORT/DB to share the instance registry with other gateways "
        "(default: this process only)",
    )
    parser.add_argument("--drain-timeout", default=f"{_default('drain_timeout_s')}s")
    parser.add_argument(
        "--policy", default=_default("policy"), help="scheduling policy (default: slo_aware)"
    )
    parser.add_argument(
        "--kv-metadata",
        default=_default("kv_metadata"),
        help="metadata store feeding the prefix index (strata://HOST:PORT or redis://...)",
    )
    parser.add_argument("--ttft-slo", default="", help="default TTFT SLO, e.g. 500ms")
    parser.add_argument("--tpot-slo", default="", help="default time per output token SLO")
    parser.add_argument(
        "--local-prefill-threshold",
        type=int,
        default=_default("local_prefill_threshold_tokens"),
        help="uncached prompt tokens below which the decode worker prefills itself",
    )
    parser.add_argument("--no-conditional-disaggregation", action="store_true")
    parser.add_argument(
        "--no-profile", action="store_true", help="do not profile workers as they become ready"
    )
    parser.add_argument(
        "--profile-budget",
        default=f"{_default('profile_budget_s'):g}s",
        help="wall-clock bound of each worker's start-up profile, e.g. 40s",
    )
    parser.add_argument(
        "--profile-max-step",
        default=f"{_default('profile_max_step_s'):g}s",
        help="longest predicted call of the profile (a client waits at most this behind it)",
    )
    admin = parser.add_argument_group("admin API (`strata admin`)")
    admin.add_argument(
        "--admin-port", type=int, default=None, help="serve the admin API here (default: off)"
    )
    admin.add_argument("--admin-host", default=_default("admin_host"))
    admin.add_argument(
        "--admin-token-file",
        default=None,
        help="file holding the admin token (default: $STRATA_ADMIN_TOKEN)",
    )
    launch = parser.add_argument_group("launcher (workers started by this gateway)")
    launch.add_argument(
        "--launch-store", default="", help="store node HOST:PORT for launched workers (enables)"
    )
    launch.add_argument("--launch-prefill", type=int, default=0, help="prefill workers at start")
    launch.add_argument("--launch-decode", type=int, default=0, help="decode workers at start")
    launch.add_argument("--launch-kv-metadata", default="", help="workers' --kv-metadata URL")
    launch.add_argument("--launch-kv-cache-size", default=_default("launch_kv_cache_size"))
    launch.add_argument("--launch-max-model-len", type=int, default=None)
    launch.add_argument(
        "--launch-worker-args", default="", help='more worker arguments, e.g. "--max-num-seqs 8"'
    )
    launch.add_argument(
        "--launch-cores-per-engine", type=int, default=_default("launch_cores_per_engine")
    )
    launch.add_argument("--launch-cpus", default=None, help="core list, e.g. 0-3 (default: all)")
    launch.add_argument("--launch-log-dir", default=None, help="worker logs (default: stdout)")
    return parser
