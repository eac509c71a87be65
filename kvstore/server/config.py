"""The store node's one configuration object.

``StoreNodeConfig`` is validated on construction, so a node never starts half-configured. Its
fields declare the command line and the environment (:mod:`strata_common.options`): every option
``--arena-size`` can also be given as ``STRATA_KVSTORE_ARENA_SIZE``; the command line wins.
Sizes are written like ``"2GiB"``, ``"512MiB"``, ``"4KiB"`` (binary) or ``"1GB"`` (decimal);
durations like ``"30s"``, ``"250ms"``, ``"5m"``, ``"24h"``. Boolean options take ``true``/``false``;
``--no-promote`` is a shorthand for ``--promote false``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvstore.metadata import parse_metadata_spec
from kvstore.policy.factory import PolicyKind
from kvstore.wire.frame import DEFAULT_MAX_BLOCK_BYTES
from strata_common.credentials import Identity, read_cluster_key
from strata_common.endpoints import is_wildcard
from strata_common.options import from_cli, group, option
from strata_common.tls import INSECURE_HELP, TLS_FLAGS, TlsConfig, check_listen
from strata_common.units import parse_duration, parse_size

__all__ = ["StoreNodeConfig"]


ENV_PREFIX = "STRATA_KVSTORE_"
SSD_SYNC_MODES = ("data", "full", "none")
LEAVE_POLICIES = ("drop", "migrate")
MIN_SSD_SIZE_BYTES = 16 * 1024**2


@dataclass(frozen=True, slots=True)
class StoreNodeConfig:
    """Everything a store node needs; validated in ``__post_init__``.

    Attributes:
        host: address to listen on (loopback by default: the node has no authentication yet).
        port: TCP port; 0 picks a free one (the ready line reports which).
        arena_size_bytes: size of the one preallocated DRAM arena, reserved at start-up.
        page_size_bytes: allocation unit of the arena; blocks take whole pages.
        max_block_bytes: largest block (header + payload) a PUT may carry; a bigger one is read
            and dropped, and answered TOO_LARGE (the connection stays usable).
        put_timeout_s: a PUT whose payload has not fully arrived after this long is abandoned:
            its connection is closed and its space revoked. 20 s by default, so that a key whose
            writer hung is writable again within 30 s (the reaper checks every second).
        lease_timeout_s: a connection that has held a shared-memory / RDMA lease (GET_SHM,
            LEASE_BATCH) this long without releasing it is closed, which releases all it holds: a
            hung reader pins arena space for at most this long. A reader still copying when its
            lease is taken away reads bytes that fail their checksum: a refetch, never bad data.
        max_connections: connections open at once; one more is closed as soon as it is accepted
            (logged at most every 10 s). 512 by default: a node serves its host's workers (two
            clients per engine process), its peers' pooled sockets and tools -- tens of
            connections --, and 512 stays under the common 1024 open-files limit. Each costs a
            68 KiB receive buffer at most (touched only as large frames arrive): 34 MiB for all.
        header_timeout_s: a frame whose first bytes arrived must be complete within this long
            (its 24-byte header, and the payload of any request but a PUT: at most 64 KiB); a
            connection stalled mid-frame is closed. 10 s by default: a client sends a frame in
            one write, so only a stalled peer or a lossy link takes seconds. PUT payloads have
            ``put_timeout_s``. The clock runs only while the node reads the connection. On a
            node with a cluster key it also bounds the HELLO handshake, from the accept.
        idle_timeout_s: a connection with nothing received and nothing sent for this long is
            closed (whatever it holds is released). 300 s by default: long enough that a worker
            between bursts keeps its connection, short enough that the slots of clients gone
            without a FIN come back; the clients reconnect transparently on their next call.
        max_pinned_fraction: share of the arena all connections together may hold pinned by
            leases (GET_SHM, LEASE_BATCH) and reservations (RESERVE_BATCH), so that at least the
            rest can always be evicted for new blocks. Beyond it a lease is refused (the client
            reads that block over TCP, which pins it only while it is sent) and a RESERVE_BATCH
            is answered FULL (the client streams PUTs). 0.5 by default.
        max_pinned_per_connection: share of the arena one connection may hold pinned: one idle
            or hung client cannot pin more (it is cut off after ``lease_timeout_s``). A lease
            beyond it is deferred (LEASE_DEFERRED: the client asks again after releasing what it
            holds; a connection holding nothing always gets one block), a RESERVE_BATCH beyond it
            is answered FULL. 0.25 by default: the client keeps two batches of 128 blocks in
            flight, 512 MiB of 2 MiB blocks, which a 2 GiB arena allows whole.
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
        write_through: write-behind whose PUT (and COMMIT_BATCH) replies wait for the SSD
            commit: an acknowledged block survives a kill of the node (a PUT's OK otherwise
            acknowledges the DRAM copy; STATS ``tiers.persisted`` counts what reached SSD).
        promote: copy a block read from SSD into DRAM (inline, into the arena extent it is read
            into); if False, SSD hits are served from a transient arena extent.
        node_id: this node's id in the cluster (default ``host:port``, the bound port).
        advertise_address: the address registered in the cluster for peers and workers to dial
            (default ``host``; required with a cluster when ``host`` is a wildcard address).
        metadata: ``redis://HOST:PORT/DB``, ``"embedded"``, ``strata://HOST:PORT`` (another
            node's embedded metadata), or None (standalone; no events).
        metadata_port: with ``metadata="embedded"``, the port of the node's gRPC metadata service
            on ``host`` (``strata://HOST:METADATA_PORT`` for the host's other processes); 0 picks a
            free one, printed as ``kvstore metadata on strata://HOST:PORT`` before the ready line.
        metrics_port: the port of ``GET /metrics`` (Prometheus text, kvstore/server/metrics.py) on
            ``host``; 0 picks a free one, printed as ``kvstore metrics on HOST:PORT`` before the
            ready line; None (the default): no metrics port. It serves counts only, in plain HTTP
            without authentication (as a scraper expects), on ``host``, which the listen rule
            governs for both ports (docs/design/security.md §2, §7, §8).
        cluster_key_file: the cluster key (a 0600 file, docs/design/security.md §3.2): every
            store connection must prove it holds it (HELLO, §4) and the
            metadata service answers only callers holding it, by identity and RPC
            (``kvstore.cluster.access``), and this node calls another node's metadata as
            ``store/NODE_ID``. None: no authentication (loopback only).
        heartbeat_interval_s / heartbeat_timeout_s: liveness (docs/design/kvstore.md §10.7).
        leave_policy: on graceful stop, ``"drop"`` the blocks or ``"migrate"`` DRAM to a peer.
        replicate_on_read: keep a local copy of a block read through from a peer.
        hint_timeout_s: a MATCH_PREFIX whose hint names a live peer asks that peer for the
            keys this node's tiers and index lack, and waits this long for its answer
            (connecting included); beyond it, or on any error, the match is not extended. 250 ms
            by default: one round trip between hosts takes well under a millisecond, and the
            decode engine's scheduler waits for the match (docs/design/kvstore.md §10.9).
        event_flush_interval_s: KV events of PUT/DELETE are batched for this long.
        reconcile_interval_s: period of the full tier diff, a safety net behind the exact tier
            events (docs/design/kvstore.md §10.7).
        eviction_policy: the DRAM tier's eviction policy, a
            :class:`kvstore.policy.factory.PolicyKind` value: lru, s3fifo, arc, sieve, w-tinylfu,
            second-hit-lru (docs/design/kvstore.md §6).
    """

    host: str = option("127.0.0.1", help="address to listen on")
    port: int = option(7600, help="TCP port (0 = any free port)")
    arena_size_bytes: int = option(2 * 1024**3, parse=parse_size, help="DRAM arena size, e.g. 2GiB")
    page_size_bytes: int = option(4096, parse=parse_size, help="arena allocation unit, e.g. 4KiB")
    max_block_bytes: int = option(
        DEFAULT_MAX_BLOCK_BYTES,
        flag="max-block-size",
        parse=parse_size,
        help="largest accepted block, e.g. 64MiB",
    )
    put_timeout_s: float = option(
        20.0, parse=parse_duration, help="abandon a PUT after this long, e.g. 20s"
    )
    lease_timeout_s: float = option(
        30.0,
        parse=parse_duration,
        help="drop a connection that holds a shared-memory lease this long, e.g. 30s",
    )
    max_connections: int = option(512, help="connections open at once; more are closed")
    header_timeout_s: float = option(
        10.0, parse=parse_duration, help="close a connection stalled mid-frame this long, e.g. 10s"
    )
    idle_timeout_s: float = option(
        300.0, parse=parse_duration, help="close a connection without traffic this long, e.g. 5m"
    )
    max_pinned_fraction: float = option(
        0.5, help="share of the arena all connections may hold leased or reserved"
    )
    max_pinned_per_connection: float = option(
        0.25, help="share of the arena one connection may hold leased or reserved"
    )
    arena_dir: str = option("/dev/shm", help="directory of the arena file")
    prefault: bool = option(True, help="touch the whole arena at start-up (true/false)")
    log_level: str = option("INFO", help="logging level")
    ssd_dir: str | None = option(None, help="SSD tier directory (lmdb); none = DRAM only")
    ssd_size_bytes: int = option(
        16 * 1024**3, parse=parse_size, help="SSD tier size (lmdb map size), e.g. 64GiB"
    )
    ssd_ttl_s: float = option(
        24 * 3600.0, parse=parse_duration, help="SSD blocks expire this long after written"
    )
    ssd_sync: str = option("data", help="SSD commit durability: data, full or none")
    ssd_sweep_interval_s: float = option(
        60.0, parse=parse_duration, help="expired-block sweep period"
    )
    ssd_read_threads: int = option(8, help="threads reading the SSD tier")
    high_watermark: float = option(0.90, help="spill DRAM to SSD above this fraction")
    low_watermark: float = option(0.75, help="stop spilling below this fraction")
    promote: bool = option(
        True,
        negative_flag="no-promote",
        negative_help="serve SSD hits without copying them into DRAM (same as --promote false)",
        help="copy SSD hits into DRAM (true/false)",
    )
    write_behind: bool = option(False, help="copy every new block to SSD (true/false)")
    write_through: bool = option(
        False, help="answer a PUT only once its block is on SSD (true/false; implies write-behind)"
    )
    cluster_key_file: str | None = option(
        None,
        help="the cluster key (a 0600 file of 64 hex digits): every connection must prove it "
        "holds it (HELLO) before any other request, and every call to the metadata service "
        "carries it; none = no credentials (loopback only)",
    )
    insecure: bool = option(False, help=INSECURE_HELP)
    tls: TlsConfig = group(
        TlsConfig, title="TLS mode (docs/design/security.md §3.1)", prefix="tls-"
    )
    node_id: str | None = option(
        None, help="node id in the cluster (default: the TLS certificate's name, else host:port)"
    )
    advertise_address: str | None = option(
        None,
        help="the address peers and workers dial, registered in the cluster (default: --host; "
        "required when --host is a wildcard such as 0.0.0.0 and the node joins a cluster)",
    )
    metadata: str | None = option(None, help="redis://HOST:PORT/DB, embedded, or none")
    metadata_port: int = option(0, help="gRPC port serving embedded metadata (0 = any)")
    metrics_port: int | None = option(
        None,
        help="HTTP port of GET /metrics (Prometheus; counts only, no authentication; 0 = any "
        "free port); none: no metrics port",
    )
    heartbeat_interval_s: float = option(1.0, parse=parse_duration, help="heartbeat period")
    heartbeat_timeout_s: float = option(5.0, parse=parse_duration, help="dead after this")
    leave_policy: str = option("drop", help="on graceful stop: drop or migrate")
    replicate_on_read: bool = option(False, help="keep peers' blocks read through")
    hint_timeout_s: float = option(
        0.25,
        parse=parse_duration,
        help="how long a MATCH_PREFIX waits for the peer its hint names (then: no extension)",
    )
    event_flush_interval_s: float = option(0.01, parse=parse_duration, help="KV event batching")
    reconcile_interval_s: float = option(60.0, parse=parse_duration, help="full tier diff period")
    eviction_policy: str = option("lru", help="DRAM eviction policy, e.g. lru")

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
        if self.lease_timeout_s <= 0:
            raise ValueError("lease_timeout_s must be positive")
        if not 1 <= self.max_connections <= 65536:
            raise ValueError(f"max_connections must be in [1, 65536], got {self.max_connections}")
        if self.header_timeout_s <= 0 or self.idle_timeout_s <= 0:
            raise ValueError("header_timeout_s and idle_timeout_s must be positive")
        if not 0 < self.max_pinned_per_connection <= self.max_pinned_fraction <= 1:
            raise ValueError(
                "need 0 < max_pinned_per_connection <= max_pinned_fraction <= 1, got "
                f"{self.max_pinned_per_connection} and {self.max_pinned_fraction}"
            )
        if not os.path.isdir(self.arena_dir):
            raise ValueError(f"arena_dir does not exist: {self.arena_dir}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"unknown log_level {self.log_level!r}")
        if self.ssd_dir is not None:
            if not self.ssd_dir:
                raise ValueError("ssd_dir must not be empty (None disables the SSD tier)")
            if os.path.exists(self.ssd_dir) and not os.path.isdir(self.ssd_dir):
                raise ValueError(f"ssd_dir is not a directory: {self.ssd_dir}")
        if self.write_through and self.ssd_dir is None:
            raise ValueError("write_through needs an SSD tier (ssd_dir)")
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
            if self.advertise_address is None and is_wildcard(self.host):
                raise ValueError(
                    f"--host {self.host} listens on every address: give --advertise-address, "
                    "the address this node's peers and workers dial"
                )
        if self.advertise_address is not None and (
            not self.advertise_address or is_wildcard(self.advertise_address)
        ):
            raise ValueError(
                f"--advertise-address must be a dialable address, got {self.advertise_address!r}"
            )
        if not 0 <= self.metadata_port <= 65535:
            raise ValueError(f"metadata_port out of range: {self.metadata_port}")
        if self.metadata_port and self.metadata != "embedded":
            raise ValueError("metadata_port needs metadata 'embedded' (the metadata it serves)")
        if self.metadata_port and self.metadata_port == self.port:
            raise ValueError("metadata_port must differ from port")
        if self.metrics_port is not None:
            if not 0 <= self.metrics_port <= 65535:
                raise ValueError(f"metrics_port out of range: {self.metrics_port}")
            if self.metrics_port and self.metrics_port in (self.port, self.metadata_port):
                raise ValueError("metrics_port must differ from port and metadata_port")
        if self.cluster_key_file is not None:
            read_cluster_key(Path(self.cluster_key_file))  # CredentialError (a ValueError): why
            if self.node_id is not None:
                Identity("store", self.node_id)  # the name this node is known by
        check_listen(
            self.host, "--host", secured=self.tls.enabled, insecure=self.insecure, needs=TLS_FLAGS
        )
        if self.tls.enabled:  # its certificate names this node
            self.tls.name_for("store", self.node_id, "node_id")
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        if self.leave_policy not in LEAVE_POLICIES:
            raise ValueError(f"leave_policy must be one of {', '.join(LEAVE_POLICIES)}")
        if self.hint_timeout_s <= 0:
            raise ValueError("hint_timeout must be positive")
        if self.event_flush_interval_s <= 0 or self.reconcile_interval_s <= 0:
            raise ValueError("event_flush_interval and reconcile_interval must be positive")
        names = [kind.value for kind in PolicyKind]
        if self.eviction_policy not in names:
            raise ValueError(f"eviction_policy must be one of {', '.join(names)}")

    @classmethod
    def from_cli(
        cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
    ) -> StoreNodeConfig:
        """Build from command-line arguments, with ``STRATA_KVSTORE_*`` variables as defaults;
        a bad value exits with status 2 and a message naming the flag."""
        return from_cli(
            cls,
            argv,
            env_prefix=ENV_PREFIX,
            environ=os.environ if env is None else env,
            prog="python -m kvstore.server",
            description="Run a Strata KV-cache store node.",
        )
