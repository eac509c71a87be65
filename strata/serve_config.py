"""ServeConfig: what `strata serve` is asked for, validated once; its fields declare the flags.

Every flag can also be given as a ``STRATA_SERVE_*`` environment variable (the flag wins), as for
every other component (:mod:`strata_common.options`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from controlplane.admin.config import DEFAULT_ADMIN_PORT
from dataplane.hardware import DTYPES
from strata_common.options import option
from strata_common.tls import check_listen
from strata_common.units import parse_duration, parse_size

__all__ = ["ENV_PREFIX", "MAX_WORKERS", "ServeConfig"]

ENV_PREFIX = "STRATA_SERVE_"
MAX_WORKERS = 64


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """One store node, the gateway and its launched workers on this host."""

    model: Path | None = option(
        None, help="HF model directory; none: SmolLM2-135M-Instruct, prepared on first use"
    )
    served_model_name: str | None = option(
        None, help="model name for clients; none: the directory's name"
    )
    host: str = option("127.0.0.1", help="address of the OpenAI API")
    port: int = option(8000, help="port of the OpenAI API")
    kv_cache_size: int = option(1 << 30, parse=parse_size, help="KV cache per engine")
    store_arena_size: int = option(2 << 30, parse=parse_size, help="the store node's DRAM arena")
    max_model_len: int | None = option(None, help="longest prompt + output (none: the model's)")
    cache_dir: Path | None = option(
        None, help="prepared models and the SSD tier (none: ~/.cache/strata)"
    )
    kv_ssd_dir: Path | None = option(None, help="the store's SSD tier (none: CACHE_DIR/kvstore)")
    kv_ssd_size: int = option(16 << 30, parse=parse_size, help="SSD tier capacity")
    kv_ssd_ttl_s: float = option(
        24 * 3600.0, parse=parse_duration, help="SSD blocks expire after this"
    )
    kv_ssd: bool = option(
        True,
        negative_flag="no-kv-ssd",
        negative_help="DRAM-only store: nothing survives a restart (same as --kv-ssd false)",
        help="give the store an SSD tier (write-behind: a restarted serve still has every block)",
    )
    kv_ssd_write_through: bool = option(
        False,
        help="answer the workers' KV saves only once on SSD (true/false): a killed store loses no "
        "saved block, at the cost of a disk commit in each save",
    )
    ready_timeout_s: float = option(600.0, parse=parse_duration, help="start-up bound per service")
    dtype: str = option(
        "auto",
        help="engine dtype (" + ", ".join(DTYPES) + "); auto: vLLM's choice on a GPU, bfloat16 on "
        "a CPU with AVX-512 BF16 and no AMX, float32 on other CPUs (each worker logs its choice)",
    )
    prefill_workers: int = option(1, help="prefill engines at start")
    decode_workers: int = option(1, help="decode engines at start")
    standby_workers: int = option(
        0,
        help="engines of each role kept started in reserve: `strata admin scale` and the "
        "restart of a failed worker take one in seconds; each costs an engine's memory",
    )
    api_keys_file: Path | None = option(
        None,
        help="API keys and their tenants, `KEY TENANT` per line (a 0600 file): clients must "
        "send one (Authorization: Bearer KEY), and each tenant's prefix cache is its own "
        "(none: no keys, one tenant)",
    )
    insecure: bool = option(
        False,
        help="serve the OpenAI API on a non-loopback --host without API keys (logged at every "
        "start; docs/design/security.md §7)",
    )
    admin_port: int | None = option(
        None,
        help=f"admin API port on 127.0.0.1 (none: {DEFAULT_ADMIN_PORT}, or a free port when it is "
        "taken; 0 = a free port)",
    )

    def __post_init__(self) -> None:
        for name in ("prefill_workers", "decode_workers"):
            count = getattr(self, name)
            if not 1 <= count <= MAX_WORKERS:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} must be in 1..{MAX_WORKERS}, got {count}")
        if not 0 <= self.standby_workers <= MAX_WORKERS:
            raise ValueError(
                f"--standby-workers must be in 0..{MAX_WORKERS}, got {self.standby_workers}"
            )
        if self.model is not None and not (self.model / "config.json").is_file():
            raise ValueError(f"{self.model} is not a Hugging Face model directory")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.admin_port is not None and not 0 <= self.admin_port <= 65535:
            raise ValueError(f"--admin-port must be in 0..65535, got {self.admin_port}")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError(f"--max-model-len must be >= 16, got {self.max_model_len}")
        if not self.ready_timeout_s > 0:
            raise ValueError("--ready-timeout must be positive")
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ValueError(f"--api-keys-file {self.api_keys_file} is not a file")
        check_listen(  # the gateway's own check, before anything is started
            self.host,
            "--host",
            secured=self.api_keys_file is not None,
            insecure=self.insecure,
            needs="API keys (--api-keys-file)",
        )
        if self.kv_ssd_write_through and not self.kv_ssd:
            raise ValueError("--kv-ssd-write-through needs the SSD tier (not --no-kv-ssd)")
