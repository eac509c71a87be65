"""Gateway configuration: one frozen dataclass, validated on construction, built from the CLI.

`GatewayConfig.from_argv(argv)` is the only place command-line flags are declared; every flag maps
to one field of the same name, so the field list below is the complete set of knobs.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

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
    """gRPC endpoints (HOST:PORT) of prefill workers; requests are spread round-robin."""
    decode_endpoints: tuple[str, ...]
    """gRPC endpoints (HOST:PORT) of decode workers; requests are spread round-robin."""
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

    def __post_init__(self) -> None:
        if not self.model_dir.is_dir():
            raise ConfigError(f"model_dir {str(self.model_dir)!r} is not a directory")
        if not self.served_model_name or any(c.isspace() for c in self.served_model_name):
            raise ConfigError(
                f"served_model_name {self.served_model_name!r} must be non-empty, no whitespace"
            )
        for name in ("prefill_endpoints", "decode_endpoints"):
            endpoints = getattr(self, name)
            if not endpoints:
                raise ConfigError(f"{name} must name at least one HOST:PORT")
            for endpoint in endpoints:
                parse_endpoint(endpoint)
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
                prefill_endpoints=tuple(_split_endpoints(args.prefill)),
                decode_endpoints=tuple(_split_endpoints(args.decode)),
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
            )
        except ConfigError as exc:
            parser.error(str(exc))  # exits with status 2


def _split_endpoints(values: list[str]) -> list[str]:
    """`--prefill a:1 --prefill b:2` and `--prefill a:1,b:2` mean the same."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


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
    parser.add_argument(
        "--prefill", action="append", required=True, help="prefill worker HOST:PORT (repeatable)"
    )
    parser.add_argument(
        "--decode", action="append", required=True, help="decode worker HOST:PORT (repeatable)"
    )
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
    return parser
