"""WorkerConfig: the one validated configuration of a data-plane worker.

Its fields declare the ``strata worker`` flags and their ``STRATA_WORKER_*`` environment variables
(:mod:`strata_common.options`); ``__post_init__`` validates, so a bad value is a usage error
before any engine starts.
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dataplane.hardware import DTYPES
from kvstore.metadata import parse_metadata_spec
from strata_common.credentials import Identity, read_cluster_key
from strata_common.endpoints import format_endpoint, is_wildcard, parse_endpoint
from strata_common.options import add_options, group, option, parse_into
from strata_common.secrets import redact_url
from strata_common.tls import INSECURE_HELP, TLS_FLAGS, TlsConfig, check_listen
from strata_common.units import parse_duration, parse_size

ENV_PREFIX = "STRATA_WORKER_"


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
    role: WorkerRole = option(help="prefill, decode or both")
    model_dir: Path = option(flag="model", help="HF model directory")
    store_endpoint: str = option(flag="store", help="the store node, HOST:PORT")
    host: str = option("127.0.0.1", help="address the gRPC service listens on")
    port: int = option(0, help="gRPC port (0 = any free port, printed when ready)")
    kv_cache_bytes: int = option(
        1 << 30, flag="kv-cache-size", parse=parse_size, help='engine KV cache, e.g. "2GiB"'
    )
    max_model_len: int | None = option(None, help="longest prompt + output; none: the model's")
    max_num_seqs: int = option(32, help="most requests the engine runs at once")
    max_concurrent_rpcs: int | None = option(
        None,
        help="gRPC calls served at once, more are refused RESOURCE_EXHAUSTED "
        "(default: 8 x max-num-seqs + 16)",
    )
    """Calls the gRPC service runs at once (``maximum_concurrent_rpcs``); beyond them a call is
    refused with RESOURCE_EXHAUSTED, which the gateway reads as an overloaded worker. Default
    :attr:`rpc_limit`: every request in flight is one Prefill or Decode call, the engine runs
    ``max_num_seqs`` of them and queues the rest; a queue of seven batches more is more than any
    latency target waits out, and 16 calls are left for Health and Stats probes."""
    dtype: str = option(
        "auto",
        help="engine dtype (" + ", ".join(DTYPES) + "); auto: vLLM's on a GPU, bfloat16 on a CPU "
        "with AVX-512 BF16 and no AMX, float32 on other CPUs",
    )
    """The engine's dtype; "auto": what this host computes fast (dataplane/hardware.py)."""
    enforce_eager: bool = option(
        True,
        negative_flag="compile",
        negative_help="torch.compile the model (slow start; same as --enforce-eager false)",
        help="run the model eagerly, without torch.compile",
    )
    enable_prefix_caching: bool = option(
        True,
        flag="prefix-caching",
        negative_flag="no-prefix-caching",
        help="the engine's prefix cache",
    )
    seed: int = 0
    kv_metadata: str | None = option(
        None,
        help="metadata store for HBM events (redis://HOST:PORT/DB, strata://HOST:PORT); "
        "none: publish none",
    )
    """Metadata store (``kvstore.metadata.open_metadata_store`` spec) that receives this worker's
    HBM events; None: no events."""
    instance_id: str | None = option(
        None, help="event source id (default: HOST:PORT, HOST the --advertise-address if given)"
    )
    """This worker's event source id; default ``HOST:PORT`` (the bound gRPC endpoint, with the
    advertised host: two workers on 0.0.0.0 of two hosts must not share an id)."""
    reuse_port: bool = option(
        False,
        help="bind the gRPC port with SO_REUSEPORT: set by a launcher that holds the port "
        "reserved (Linux shares such a port with processes of the same user only); off, no "
        "other process can bind the port beside this worker",
    )
    cluster_key_file: Path | None = option(
        None,
        help="the cluster key (0600 file): this worker proves it holds it to the store node and "
        "the metadata service (HBM events as worker/INSTANCE_ID), and its gRPC service answers "
        "only role gateway; none = no credentials (loopback only)",
    )
    """docs/design/security.md §3.2, §4, §5.1: with a key, every Worker RPC needs a gateway's
    credentials, this worker publishes its HBM events as ``worker/INSTANCE_ID`` (its event
    source id) and authenticates to the store node. The key itself is never on the command
    line."""
    insecure: bool = option(False, help=INSECURE_HELP)
    """Serve a non-loopback ``host`` without TLS (docs/design/security.md §7)."""
    tls: TlsConfig = group(
        TlsConfig, title="TLS mode (docs/design/security.md §3.1)", prefix="tls-"
    )
    """Mutual TLS under the cluster CA: the gRPC service requires a client certificate (role
    gateway only), and this worker presents its own (``worker/INSTANCE_ID``) to the metadata
    service. Takes precedence over the cluster key for connections."""
    kv_heartbeat_interval_s: float = option(
        1.0, parse=parse_duration, help="with --kv-metadata: membership heartbeat period"
    )
    """With ``kv_metadata``: how often the worker renews its membership (kind ``engine``)."""
    kv_heartbeat_timeout_s: float = option(
        5.0,
        parse=parse_duration,
        help="with --kv-metadata: silent this long = dead, HBM entries dropped",
    )
    """With ``kv_metadata``: a worker silent this long is reaped and its HBM entries leave the
    index (the same defaults as a store node's)."""
    advertise_address: str | None = option(
        None,
        metavar="ADDR",
        help="the address others dial to reach this worker (a pod's IP, the host's name); "
        "default: --host; required with --announce when --host is 0.0.0.0 or ::",
    )
    """What gateways dial and this worker announces (with the bound port), and its default
    instance id: ``ADDR:PORT``. A host, no port."""
    announce: str | None = option(
        None,
        metavar="REDIS_URL",
        help="announce this worker in the gateways' shared registry (their --registry: "
        "redis://HOST:PORT/DB, rediss://, unix://), sealed with --cluster-key-file if given; "
        "every gateway on that registry serves it (docs/design/multihost.md §3)",
    )
    """The Redis of the gateways' registry: the worker announces itself there once serving
    (:mod:`dataplane.announcer`); a password belongs in ``STRATA_WORKER_ANNOUNCE``, not argv."""
    announce_interval_s: float = option(
        2.0, parse=parse_duration, help="with --announce: how often the announcement is renewed"
    )
    announce_ttl_s: float = option(
        10.0,
        parse=parse_duration,
        help="with --announce: the announcement expires this long after its last renewal "
        "(a worker that stopped without withdrawing it is drained then)",
    )
    drain_notice_s: float = option(
        3.0,
        parse=parse_duration,
        help="on SIGTERM: how long Health reports draining before the worker waits for its "
        "requests (at least one gateway health round, so that no new request arrives after)",
    )
    drain_timeout_s: float = option(
        60.0,
        parse=parse_duration,
        help="on SIGTERM: the longest wait for the requests in flight to end before the worker "
        "stops (keep drain notice + this below a pod's terminationGracePeriodSeconds)",
    )
    engine_heap_trim_interval_s: float = option(
        60.0,
        parse=parse_duration,
        help="how often the engine's model runner returns its freed heap to the system "
        "(malloc_trim between steps, glibc only; strata_common/heap.py); 0 = never",
    )
    engine_onednn_cache: int | None = option(
        None,
        metavar="N",
        help="the most oneDNN primitives the engine's model runner keeps compiled (one per "
        "linear layer shape and step token count; sets ONEDNN_PRIMITIVE_CACHE_CAPACITY); "
        "default: oneDNN's 1024; 0 = none kept (dataplane/README.md, \"The engine's memory\")",
    )
    """Bounds the model runner's memory for compiled kernels: oneDNN JIT-compiles a primitive for
    every new token count a step has and keeps up to this many (process-wide, least recently
    used out). Fewer costs recompiles where a load's step shapes are many."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir).resolve())
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
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be ≥ 1, got {self.max_concurrent_rpcs}")
        parse_endpoint(self.store_endpoint)  # raises ValueError naming the endpoint
        if self.kv_metadata is not None:
            try:
                spec = parse_metadata_spec(self.kv_metadata)
            except ValueError as exc:
                raise ValueError(f"kv_metadata: {exc}") from None
            if not spec.shared:
                raise ValueError(
                    "kv_metadata must name a metadata store other processes can reach "
                    "(redis://HOST:PORT/DB or strata://HOST:PORT), got "
                    f"{redact_url(self.kv_metadata)!r}"
                )
        if not 0 < self.kv_heartbeat_interval_s < self.kv_heartbeat_timeout_s:
            raise ValueError(
                "need 0 < kv_heartbeat_interval_s < kv_heartbeat_timeout_s, got "
                f"{self.kv_heartbeat_interval_s} and {self.kv_heartbeat_timeout_s}"
            )
        self._check_announce()
        if not self.engine_heap_trim_interval_s >= 0:
            raise ValueError(
                f"engine_heap_trim_interval_s must be >= 0, got {self.engine_heap_trim_interval_s}"
            )
        if self.engine_onednn_cache is not None and self.engine_onednn_cache < 0:
            raise ValueError(f"engine_onednn_cache must be >= 0, got {self.engine_onednn_cache}")
        if not self.drain_notice_s >= 0 or not self.drain_timeout_s >= 0:
            raise ValueError(
                "need drain_notice_s >= 0 and drain_timeout_s >= 0, got "
                f"{self.drain_notice_s} and {self.drain_timeout_s}"
            )
        if self.instance_id is not None and not 0 < len(self.instance_id.encode()) <= 255:
            raise ValueError("instance_id must be 1..255 bytes of UTF-8")
        check_listen(
            self.host, "--host", secured=self.tls.enabled, insecure=self.insecure, needs=TLS_FLAGS
        )
        if self.tls.enabled:  # its certificate names this worker
            name = self.tls.name_for("worker", self.instance_id, "instance_id")
            object.__setattr__(self, "instance_id", name)
        if self.cluster_key_file is not None:
            read_cluster_key(self.cluster_key_file)  # CredentialError (a ValueError) says why
            # This worker's identity name (its event source id): checked now, not once serving.
            Identity("worker", self.instance_id or self.advertised_endpoint(self.port or 1))

    def _check_announce(self) -> None:
        if self.advertise_address is not None:
            host = self.advertise_address
            try:
                parse_endpoint(format_endpoint(host, 1))
            except ValueError:
                raise ValueError(
                    f"advertise_address must be a host name or IP address (no port), got {host!r}"
                ) from None
            if is_wildcard(host):
                raise ValueError(f"advertise_address {host!r} is a wildcard: nobody can dial it")
        if self.announce is None:
            return
        if not self.announce.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"announce {redact_url(self.announce)!r} must be a redis://, rediss:// or "
                "unix:// URL (the gateways' --registry)"
            )
        if not self.announce_ttl_s >= 1.0:
            raise ValueError(f"announce_ttl_s must be >= 1 s, got {self.announce_ttl_s}")
        if not 0 < self.announce_interval_s < self.announce_ttl_s:
            raise ValueError(
                "need 0 < announce_interval_s < announce_ttl_s (a renewal before the "
                f"announcement expires), got {self.announce_interval_s} and {self.announce_ttl_s}"
            )
        if self.advertise_address is None and is_wildcard(self.host):
            raise ValueError(
                f"--announce with --host {self.host} needs --advertise-address: the address "
                "gateways dial (e.g. the pod's IP)"
            )

    @property
    def advertised_host(self) -> str:
        """What others dial: ``advertise_address``, else ``host``."""
        return self.advertise_address if self.advertise_address is not None else self.host

    def advertised_endpoint(self, port: int) -> str:
        """``ADVERTISED_HOST:PORT`` (IPv6 in brackets): what this worker announces, and its
        default instance id."""
        return format_endpoint(self.advertised_host, port)

    @property
    def rpc_limit(self) -> int:
        """``max_concurrent_rpcs``, or its default ``8 * max_num_seqs + 16``."""
        if self.max_concurrent_rpcs is not None:
            return self.max_concurrent_rpcs
        return 8 * self.max_num_seqs + 16

    @classmethod
    def from_cli(
        cls,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        prog: str = "strata worker",
        description: str | None = None,
    ) -> WorkerConfig:
        """Parse ``strata worker`` arguments; a bad value exits with status 2 and a message."""
        parser = argparse.ArgumentParser(prog=prog, description=description)
        add_options(parser, cls, env_prefix=ENV_PREFIX, environ=environ)
        return parse_into(parser, cls, argv)
