"""WorkerConfig: the one validated configuration of a data-plane worker."""

from __future__ import annotations

import argparse
import enum
from dataclasses import dataclass
from pathlib import Path

from dataplane.hardware import DTYPES
from kvstore.metadata import parse_metadata_spec
from strata_common.units import parse_duration, parse_size


class WorkerRole(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    @property
    def kv_role(self) -> str:
        """vLLM's connector role: prefill saves (and reuses), decode loads, both does both."""
        return {
            WorkerRole.PREFILL: "kv_both",
            WorkerRole.DECODE: "kv_consumer",
            WorkerRole.BOTH: "kv_both",
        }[self]


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    role: WorkerRole
    model_dir: Path
    store_endpoint: str
    host: str = "127.0.0.1"
    port: int = 0
    kv_cache_bytes: int = 1 << 30
    max_model_len: int | None = None
    max_num_seqs: int = 32
    dtype: str = "auto"
    """The engine's dtype; "auto": what this host computes fast (dataplane/hardware.py)."""
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    seed: int = 0
    kv_metadata: str | None = None
    """Metadata store (``kvstore.metadata.open_metadata_store`` spec) that receives this worker's
    HBM events; None: no events."""
    instance_id: str | None = None
    """This worker's event source id; default ``HOST:PORT`` (the bound gRPC endpoint)."""
    kv_heartbeat_interval_s: float = 1.0
    """With ``kv_metadata``: how often the worker renews its membership (kind ``engine``)."""
    kv_heartbeat_timeout_s: float = 5.0
    """With ``kv_metadata``: a worker silent this long is reaped and its HBM entries leave the
    index (the same defaults as a store node's)."""

    def __post_init__(self) -> None:
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"model directory {self.model_dir} has no config.json")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.kv_cache_bytes < (1 << 30):
            raise ValueError(
                "kv_cache_bytes must be at least 1GiB (vLLM's CPU backend needs ≥1 GiB)"
            )
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError(f"max_model_len must be ≥ 16, got {self.max_model_len}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be ≥ 1, got {self.max_num_seqs}")
        if ":" not in self.store_endpoint:
            raise ValueError(f"store endpoint must be HOST:PORT, got {self.store_endpoint!r}")
        if self.kv_metadata is not None:
            try:
                spec = parse_metadata_spec(self.kv_metadata)
            except ValueError as exc:
                raise ValueError(f"kv_metadata: {exc}") from None
            if not spec.shared:
                raise ValueError(
                    "kv_metadata must name a metadata store other processes can reach "
                    f"(redis://HOST:PORT/DB or strata://HOST:PORT), got {self.kv_metadata!r}"
                )
        if not 0 < self.kv_heartbeat_interval_s < self.kv_heartbeat_timeout_s:
            raise ValueError(
                "need 0 < kv_heartbeat_interval_s < kv_heartbeat_timeout_s, got "
                f"{self.kv_heartbeat_interval_s} and {self.kv_heartbeat_timeout_s}"
            )
        if self.instance_id is not None and not 0 < len(self.instance_id.encode()) <= 255:
            raise ValueError("instance_id must be 1..255 bytes of UTF-8")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--role", required=True, choices=[r.value for r in WorkerRole])
        parser.add_argument("--model", dest="model_dir", required=True, help="HF model directory")
        parser.add_argument("--store", dest="store_endpoint", required=True, help="HOST:PORT")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=0)
        parser.add_argument("--kv-cache-size", default="1GiB", help='engine KV cache, e.g. "2GiB"')
        parser.add_argument("--max-model-len", type=int, default=None)
        parser.add_argument("--max-num-seqs", type=int, default=32)
        parser.add_argument(
            "--dtype",
            default="auto",
            choices=DTYPES,
            help="engine dtype; auto: vLLM's on a GPU, bfloat16 on a CPU with AVX-512 BF16/AMX, "
            "float32 on other CPUs",
        )
        parser.add_argument("--compile", action="store_true", help="torch.compile (slow start)")
        parser.add_argument("--no-prefix-caching", action="store_true")
        parser.add_argument(
            "--kv-metadata",
            default=None,
            help="metadata store for HBM events (redis://HOST:PORT/DB, strata://HOST:PORT); "
            "default: publish none",
        )
        parser.add_argument(
            "--instance-id", default=None, help="event source id (default: HOST:PORT)"
        )
        parser.add_argument(
            "--kv-heartbeat-interval",
            default="1s",
            help="with --kv-metadata: membership heartbeat period, e.g. 1s",
        )
        parser.add_argument(
            "--kv-heartbeat-timeout",
            default="5s",
            help="with --kv-metadata: silent this long = dead, HBM entries dropped, e.g. 5s",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkerConfig:
        return cls(
            role=WorkerRole(args.role),
            model_dir=Path(args.model_dir).resolve(),
            store_endpoint=args.store_endpoint,
            host=args.host,
            port=args.port,
            kv_cache_bytes=parse_size(args.kv_cache_size),
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            dtype=args.dtype,
            enforce_eager=not args.compile,
            enable_prefix_caching=not args.no_prefix_caching,
            kv_metadata=args.kv_metadata,
            instance_id=args.instance_id,
            kv_heartbeat_interval_s=parse_duration(args.kv_heartbeat_interval),
            kv_heartbeat_timeout_s=parse_duration(args.kv_heartbeat_timeout),
        )
