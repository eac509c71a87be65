"""The store node's one configuration object, and the size/duration parsers it is built with.

``StoreNodeConfig`` is validated on construction, so a node never starts half-configured. The
command line and the environment are derived from the same field table (``_CLI_FIELDS``): every
option ``--arena-size`` can also be given as ``STRATA_KVSTORE_ARENA_SIZE``; the command line wins.
Sizes are written like ``"2GiB"``, ``"512MiB"``, ``"4KiB"`` (binary) or ``"1GB"`` (decimal);
durations like ``"30s"``, ``"250ms"``, ``"5m"``, ``"24h"``. Boolean options take ``true``/``false``;
``--no-promote`` is a shorthand for ``--promote false``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from kvstore.metadata import parse_metadata_spec
from kvstore.policy.factory import PolicyKind
from strata_common.units import parse_duration, parse_size

__all__ = ["StoreNodeConfig"]


ENV_PREFIX = "STRATA_KVSTORE_"
SSD_SYNC_MODES = ("data", "full", "none")
LEAVE_POLICIES = ("drop", "migrate")
MIN_SSD_SIZE_BYTES = 16 * 1024**2


def _parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True, slots=True)
class StoreNodeConfig:
    """Everything a store node needs; validated in ``__post_init__``.

    Attributes:
        host: address to listen on (loopback by default: the node has no authentication yet).
        port: TCP port; 0 picks a free one (the ready line reports which).
        arena_size_bytes: size of the one preallocated DRAM arena, reserved at start-up.
        page_size_bytes: allocation unit of the arena; blocks take whole pages.
        max_block_bytes: largest block (header + payload) a PUT may carry; bigger frames are
            treated as malformed and close the connection.
        put_timeout_s: a PUT whose payload has not fully arrived after this long is abandoned:
            its connection is closed and its space revoked.
        arena_dir: directory of the arena's backing file; ``/dev/shm`` so that a same-host client
            can map it for the shared-memory fast path.
        prefault: touch every arena page at start-up (faulting new memory in is slow here, and
            reserving it up front turns "out of memory later" into "refuse to start now").
        log_level: Python logging level name.
        ssd_dir: directory of the SSD tier (an lmdb environment); None = no SSD tier, DRAM only.
        ssd_size_bytes: lmdb map size: the SSD tier's files never grow past it (blocks fill it up
            to a budget that leaves headroom for lmdb itself; docs/design/kvstore.md §7.7).
        ssd_ttl_s: an SSD block expires this long after it was written (default 24 h).
        ssd_sync: durability of SSD commits: ``"data"`` (fdatasync per commit, metadata flushed
            at the next commit), ``"full"`` (both synced) or ``"none"`` (no sync; a power loss
            may corrupt the file). A process crash loses nothing committed in any mode.
        ssd_sweep_interval_s: how often expired SSD blocks are deleted.
        ssd_read_threads: threads that read the SSD (lmdb releases the GIL; the disk wants depth).
        high_watermark: fraction of the arena above which cold blocks are spilled to SSD.
        low_watermark: spilling stops once arena usage is below this fraction.
        write_behind: also copy every block committed to DRAM onto SSD in the background, so
            the SSD tier holds everything and a restarted node still has it (without it only
            spilled blocks reach SSD).
        promote: copy a block read from SSD into DRAM (inline, into the arena extent it is read
            into); if False, SSD hits are served from a transient arena extent.
        node_id: this node's id in the cluster (default ``host:port``, the bound port).
        metadata: ``redis://HOST:PORT/DB``, ``"embedded"``, ``strata://HOST:PORT`` (another
            node's embedded metadata), or None (standalone; no events).
        metadata_port: with ``metadata="embedded"``, the port of the node's gRPC metadata service
            on ``host`` (``strata://HOST:METADATA_PORT`` for the host's other processes); 0 picks a
            free one, printed as ``kvstore metadata on strata://HOST:PORT`` before the ready line.
        heartbeat_interval_s / heartbeat_timeout_s: liveness (docs/design/kvstore.md §10.7).
        leave_policy: on graceful stop, ``"drop"`` the blocks or ``"migrate"`` DRAM to a peer.
        replicate_on_read: keep a local copy of a block read through from a peer.
        event_flush_interval_s: KV events of PUT/DELETE are batched for this long.
        reconcile_interval_s: period of the full tier diff, a safety net behind the exact tier
            events (docs/design/kvstore.md §10.7).
        eviction_policy: the DRAM tier's eviction policy, a
            :class:`kvstore.policy.factory.PolicyKind` value: lru, s3fifo, arc, sieve, w-tinylfu,
            second-hit-lru (docs/design/kvstore.md §6).
    """

    host: str = "127.0.0.1"
    port: int = 7600
    arena_size_bytes: int = 2 * 1024**3
    page_size_bytes: int = 4096
    max_block_bytes: int = 64 * 1024**2
    put_timeout_s: float = 30.0
    arena_dir: str = "/dev/shm"
    prefault: bool = True
    log_level: str = "INFO"
    ssd_dir: str | None = None
    ssd_size_bytes: int = 16 * 1024**3
    ssd_ttl_s: float = 24 * 3600.0
    ssd_sync: str = "data"
    ssd_sweep_interval_s: float = 60.0
    ssd_read_threads: int = 8
    high_watermark: float = 0.90
    low_watermark: float = 0.75
    promote: bool = True
    write_behind: bool = False
    node_id: str | None = None
    metadata: str | None = None
    metadata_port: int = 0
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    leave_policy: str = "drop"
    replicate_on_read: bool = False
    event_flush_interval_s: float = 0.01
    reconcile_interval_s: float = 60.0
    eviction_policy: str = "lru"

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        page = self.page_size_bytes
        if page < 64 or page & (page - 1):
            raise ValueError(f"page_size_bytes must be a power of two >= 64, got {page}")
        if self.arena_size_bytes < page or self.arena_size_bytes % page:
            raise ValueError(
                f"arena_size_bytes ({self.arena_size_bytes}) must be a positive multiple of "
                f"page_size_bytes ({page})"
            )
        if self.max_block_bytes < 64:
            raise ValueError("max_block_bytes must be at least the 64-byte block header")
        if self.put_timeout_s <= 0:
            raise ValueError("put_timeout_s must be positive")
        if not os.path.isdir(self.arena_dir):
            raise ValueError(f"arena_dir does not exist: {self.arena_dir}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"unknown log_level {self.log_level!r}")
        if self.ssd_dir is not None:
            if not self.ssd_dir:
                raise ValueError("ssd_dir must not be empty (None disables the SSD tier)")
            if os.path.exists(self.ssd_dir) and not os.path.isdir(self.ssd_dir):
                raise ValueError(f"ssd_dir is not a directory: {self.ssd_dir}")
        if self.ssd_size_bytes < MIN_SSD_SIZE_BYTES:
            raise ValueError(f"ssd_size_bytes must be at least {MIN_SSD_SIZE_BYTES} (16 MiB)")
        if self.ssd_ttl_s <= 0:
            raise ValueError("ssd_ttl_s must be positive")
        if self.ssd_sync not in SSD_SYNC_MODES:
            raise ValueError(f"ssd_sync must be one of {', '.join(SSD_SYNC_MODES)}")
        if self.ssd_sweep_interval_s <= 0:
            raise ValueError("ssd_sweep_interval_s must be positive")
        if not 1 <= self.ssd_read_threads <= 64:
            raise ValueError("ssd_read_threads must be between 1 and 64")
        if not 0.0 < self.low_watermark < self.high_watermark <= 1.0:
            raise ValueError(
                "watermarks must satisfy 0 < low_watermark < high_watermark <= 1, got "
                f"low={self.low_watermark} high={self.high_watermark}"
            )
        if self.node_id is not None and not 0 < len(self.node_id.encode()) <= 255:
            raise ValueError("node_id must be 1..255 bytes")
        if self.metadata is not None:
            parse_metadata_spec(self.metadata)  # raises ValueError saying what is wrong
        if not 0 <= self.metadata_port <= 65535:
            raise ValueError(f"metadata_port out of range: {self.metadata_port}")
        if self.metadata_port and self.metadata != "embedded":
            raise ValueError("metadata_port needs metadata 'embedded' (the metadata it serves)")
        if self.metadata_port and self.metadata_port == self.port:
            raise ValueError("metadata_port must differ from port")
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        if self.leave_policy not in LEAVE_POLICIES:
            raise ValueError(f"leave_policy must be one of {', '.join(LEAVE_POLICIES)}")
        if self.event_flush_interval_s <= 0 or self.reconcile_interval_s <= 0:
            raise ValueError("event_flush_interval and reconcile_interval must be positive")
        names = [kind.value for kind in PolicyKind]
        if self.eviction_policy not in names:
            raise ValueError(f"eviction_policy must be one of {', '.join(names)}")

    @classmethod
    def from_cli(
        cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
    ) -> StoreNodeConfig:
        """Build from command-line arguments, with ``STRATA_KVSTORE_*`` variables as defaults."""
        environ = os.environ if env is None else env
        parser = argparse.ArgumentParser(
            prog="python -m kvstore.server", description="Run a Strata KV-cache store node."
        )
        defaults = {f.name: f.default for f in fields(cls)}
        for name, option, _parse, help_text in _CLI_FIELDS:
            env_name = ENV_PREFIX + option.upper().replace("-", "_")
            default = environ.get(env_name, defaults[name])
            parser.add_argument(
                f"--{option}",
                dest=name,
                default=default,
                help=f"{help_text} (env {env_name}; default {defaults[name]})",
            )
        parser.add_argument(
            "--no-promote",
            dest="promote",
            action="store_const",
            const="false",
            help="serve SSD hits without copying them into DRAM (same as --promote false)",
        )
        namespace = parser.parse_args(argv)
        values: dict[str, Any] = {}
        for name, option, parse, _help in _CLI_FIELDS:
            try:
                values[name] = parse(getattr(namespace, name))
            except ValueError as exc:
                parser.error(f"--{option}: {exc}")
        try:
            return cls(**values)
        except ValueError as exc:
            parser.error(str(exc))


def _parse_int(value: str | int) -> int:
    return int(value)


def _parse_str(value: str) -> str:
    return str(value)


def _parse_float(value: str | float) -> float:
    return float(value)


def _parse_optional_dir(value: str | None) -> str | None:
    """A directory, or None for ``""``/``"none"`` (the option's feature is off)."""
    if value is None or value.strip().lower() in ("", "none"):
        return None
    return str(value)


_CLI_FIELDS: tuple[tuple[str, str, Callable[[Any], Any], str], ...] = (
    ("host", "host", _parse_str, "address to listen on"),
    ("port", "port", _parse_int, "TCP port (0 = any free port)"),
    ("arena_size_bytes", "arena-size", parse_size, "DRAM arena size, e.g. 2GiB"),
    ("page_size_bytes", "page-size", parse_size, "arena allocation unit, e.g. 4KiB"),
    ("max_block_bytes", "max-block-size", parse_size, "largest accepted block, e.g. 64MiB"),
    ("put_timeout_s", "put-timeout", parse_duration, "abandon a PUT after this long, e.g. 30s"),
    ("arena_dir", "arena-dir", _parse_str, "directory of the arena file"),
    ("prefault", "prefault", _parse_bool, "touch the whole arena at start-up (true/false)"),
    ("log_level", "log-level", _parse_str, "logging level"),
    ("ssd_dir", "ssd-dir", _parse_optional_dir, "SSD tier directory (lmdb); none = DRAM only"),
    ("ssd_size_bytes", "ssd-size", parse_size, "SSD tier size (lmdb map size), e.g. 64GiB"),
    ("ssd_ttl_s", "ssd-ttl", parse_duration, "SSD blocks expire this long after written, e.g. 24h"),
    ("ssd_sync", "ssd-sync", _parse_str, "SSD commit durability: data, full or none"),
    ("ssd_sweep_interval_s", "ssd-sweep-interval", parse_duration, "expired-block sweep period"),
    ("ssd_read_threads", "ssd-read-threads", _parse_int, "threads reading the SSD tier"),
    ("high_watermark", "high-watermark", _parse_float, "spill DRAM to SSD above this fraction"),
    ("low_watermark", "low-watermark", _parse_float, "stop spilling below this fraction"),
    ("promote", "promote", _parse_bool, "copy SSD hits into DRAM (true/false)"),
    ("write_behind", "write-behind", _parse_bool, "copy every new block to SSD (true/false)"),
    ("node_id", "node-id", _parse_optional_dir, "node id in the cluster (default host:port)"),
    ("metadata", "metadata", _parse_optional_dir, "redis://HOST:PORT/DB, embedded, or none"),
    ("metadata_port", "metadata-port", _parse_int, "gRPC port serving embedded metadata (0 = any)"),
    ("heartbeat_interval_s", "heartbeat-interval", parse_duration, "heartbeat period, e.g. 1s"),
    ("heartbeat_timeout_s", "heartbeat-timeout", parse_duration, "dead after this, e.g. 5s"),
    ("leave_policy", "leave-policy", _parse_str, "on graceful stop: drop or migrate"),
    ("replicate_on_read", "replicate-on-read", _parse_bool, "keep peers' blocks read through"),
    ("event_flush_interval_s", "event-flush-interval", parse_duration, "KV event batching"),
    ("reconcile_interval_s", "reconcile-interval", parse_duration, "full tier diff period"),
    ("eviction_policy", "eviction-policy", _parse_str, "DRAM eviction policy, e.g. lru"),
)
