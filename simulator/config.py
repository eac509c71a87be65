"""The simulation's configuration: one validated, frozen :class:`SimConfig`, read from a YAML
file (examples: ``simulator/configs/``; every field is described in simulator/README.md).

Paths in the file (``profile``, ``trace``) are relative to the file. Sizes take units ("512GiB"),
durations too ("250ms"). A bad file is a ValueError that names the file and the field.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from controlplane.planning import PLANNER_NAMES
from controlplane.scheduling import POLICY_NAMES, TransferCoefficients, Transport
from controlplane.scheduling.predictor.model import PRIOR_SSD_READ, PRIOR_TRANSFERS
from kvstore.policy.factory import PolicyKind
from simulator.profile import EngineProfile, load_profile, read_mapping
from simulator.trace import ReplayScale, check_rate_profile
from strata_common.units import parse_duration, parse_size

__all__ = [
    "PlanningSettings",
    "Setup",
    "Shape",
    "SimConfig",
    "StoreConfig",
    "Timing",
    "load_config",
]


class Timing(enum.Enum):
    """How a KV load or save relates to the engine's steps (docs/design/simulator.md §3)."""

    SYNC = "sync"
    """Part of the step: the whole batch waits (Strata's connector today)."""
    ASYNC = "async"
    """Beside the steps: only the request waits (vLLM's NIXL connector, Mooncake's)."""


class Shape(enum.Enum):
    COLOCATED = "colocated"
    """Every instance prefills and decodes (role both)."""
    DISAGGREGATED = "disaggregated"
    """``prefill_gpus`` instances prefill, the others decode."""


@dataclass(frozen=True, slots=True)
class Setup:
    """One compared system: a cluster shape and a scheduling policy (docs/design/simulator.md
    §7). ``pool``: a KV pool (a store node per host) exists; without one, KV moves straight
    from the prefill to the decode instance and nothing is shared across instances."""

    name: str
    policy: str
    shape: Shape
    prefill_gpus: int = 0
    pool: bool = True
    local_prefill_threshold_tokens: int = 512
    conditional_disaggregation: bool = True
    local_fallback: bool = False
    """``SchedulingConfig.local_fallback`` (slo_aware)."""
    baseline: bool = True
    """A peer's system (counted in ``strata_vs_best_baseline``); false for Strata's variants."""
    kv_load: Timing = Timing.ASYNC
    kv_save: Timing = Timing.ASYNC
    decode_gpus: int = 0
    """GPUs of the decode pool at the start (0: every GPU the prefill pool leaves)."""
    planner: str | None = None
    """``strata`` or ``dynamo`` (controlplane.planning): the pools are resized every planning
    interval within the GPU budget; None: fixed pools."""

    def __post_init__(self) -> None:
        if self.planner is not None and self.planner not in PLANNER_NAMES[:2]:
            raise ValueError(
                f"setup {self.name}: unknown planner {self.planner!r}; one of strata, dynamo"
            )
        if self.planner is not None and self.shape is Shape.COLOCATED:
            raise ValueError(f"setup {self.name}: a planner sizes disaggregated pools")
        if self.decode_gpus < 0 or (self.decode_gpus and self.shape is Shape.COLOCATED):
            raise ValueError(f"setup {self.name}: decode_gpus is for disaggregated setups, >= 0")
        if not self.name:
            raise ValueError("a setup needs a name")
        if self.policy not in POLICY_NAMES:
            raise ValueError(
                f"setup {self.name}: unknown policy {self.policy!r}; one of {POLICY_NAMES}"
            )
        if self.shape is Shape.COLOCATED and self.prefill_gpus:
            raise ValueError(f"setup {self.name}: a colocated setup has no prefill_gpus")
        if self.shape is Shape.DISAGGREGATED and self.prefill_gpus < 1:
            raise ValueError(f"setup {self.name}: a disaggregated setup needs prefill_gpus >= 1")
        if self.policy == "conductor" and (self.shape is Shape.COLOCATED or not self.pool):
            # Without a pool its fetches would come from other engines' HBM, which the
            # simulator does not move (docs/design/simulator.md §5).
            raise ValueError(
                f"setup {self.name}: conductor disaggregates over a KV pool; use a "
                "disaggregated shape with pool: true"
            )
        if self.local_prefill_threshold_tokens < 0:
            raise ValueError(f"setup {self.name}: local_prefill_threshold_tokens must be >= 0")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Each host's store node."""

    dram_bytes: int
    ssd_bytes: int = 0
    eviction_policy: PolicyKind = PolicyKind.LRU

    def __post_init__(self) -> None:
        if self.dram_bytes < 1 or self.ssd_bytes < 0:
            raise ValueError("store: dram_bytes must be > 0 and ssd_bytes >= 0")


@dataclass(frozen=True, slots=True)
class PlanningSettings:
    """How setups with a planner resize their pools (docs/design/planner.md)."""

    interval_s: float = 60.0
    engine_start_s: float = 60.0
    """From the planner asking for an engine to its first request."""
    scale_down_after: int = 3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise ValueError("planner.interval must be > 0")
        if not (math.isfinite(self.engine_start_s) and self.engine_start_s >= 0):
            raise ValueError("planner.engine_start must be >= 0")
        if self.scale_down_after < 1:
            raise ValueError("planner.scale_down_after must be >= 1")


@dataclass(frozen=True, slots=True)
class SimConfig:
    name: str
    profile: EngineProfile
    gpus: int
    setups: tuple[Setup, ...]
    strata_setup: str
    rates: tuple[float, ...]
    ttft_slo_s: float
    tpot_slo_s: float
    store: StoreConfig
    gpus_per_host: int = 8
    network: Transport = Transport.RDMA
    transfers: Mapping[Transport, TransferCoefficients] = field(
        default_factory=lambda: MappingProxyType(dict(PRIOR_TRANSFERS))
    )
    ssd_read: TransferCoefficients = PRIOR_SSD_READ
    cache_block_tokens: int = 512
    kv_block_tokens: int = 16
    gateway_overhead_s: float = 0.002
    trace: Path | None = None
    num_requests: int = 0
    """Requests of the trace to replay (0: all)."""
    rate_profile: tuple[tuple[float, float], ...] = ()
    """(seconds, multiplier) points: each swept rate varies over time (``Trace.at_rate``)."""
    planning: PlanningSettings = PlanningSettings()
    replay: ReplayScale | None = None
    """Scale the trace's requests as loadtests/replay_trace.py does (a simulation of a replay
    against a small engine: docs/benchmarks.md, simulator vs reality)."""

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpus_per_host < 1:
            raise ValueError("gpus and gpus_per_host must be >= 1")
        if not self.setups:
            raise ValueError("no setups to compare")
        names = [s.name for s in self.setups]
        if len(set(names)) != len(names):
            raise ValueError(f"setup names must be unique: {names}")
        if self.strata_setup not in names:
            raise ValueError(f"strata_setup {self.strata_setup!r} is not one of {names}")
        tp = self.profile.tensor_parallel
        if self.gpus % tp or self.gpus_per_host % tp:
            raise ValueError(f"gpus and gpus_per_host must be multiples of tensor_parallel {tp}")
        for setup in self.setups:
            if setup.prefill_gpus >= self.gpus:
                raise ValueError(f"setup {setup.name}: prefill_gpus must leave decode GPUs")
            if setup.prefill_gpus % tp or setup.decode_gpus % tp:
                raise ValueError(
                    f"setup {setup.name}: prefill_gpus and decode_gpus must be multiples of {tp}"
                )
            if setup.prefill_gpus + setup.decode_gpus > self.gpus:
                raise ValueError(f"setup {setup.name}: prefill_gpus + decode_gpus > gpus")
        if not self.rates or any(not (math.isfinite(r) and r > 0) for r in self.rates):
            raise ValueError("rates must be a non-empty list of numbers > 0")
        if list(self.rates) != sorted(set(self.rates)):
            raise ValueError("rates must be increasing")
        for name in ("ttft_slo_s", "tpot_slo_s", "gateway_overhead_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0) or (
                name != "gateway_overhead_s" and not value
            ):
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.network is Transport.SHM:
            raise ValueError("network must be tcp or rdma")
        if set(self.transfers) != set(Transport):
            raise ValueError("transfers needs shm, tcp and rdma")
        if self.kv_block_tokens < 1 or self.cache_block_tokens % self.kv_block_tokens:
            raise ValueError("cache_block_tokens must be a multiple of kv_block_tokens")
        if self.num_requests < 0:
            raise ValueError("num_requests must be >= 0")
        if self.rate_profile:
            check_rate_profile(self.rate_profile)
        if self.replay is not None and self.cache_block_tokens != self.replay.block_tokens:
            raise ValueError(
                f"with replay, cache_block_tokens must be replay.block_tokens "
                f"({self.replay.block_tokens}): a trace block is that many tokens"
            )

    @property
    def num_instances(self) -> int:
        """Engines: one per ``tensor_parallel`` GPUs."""
        return self.gpus // self.profile.tensor_parallel

    def host_of(self, instance: int) -> str:
        return f"h{instance * self.profile.tensor_parallel // self.gpus_per_host}"

    @property
    def block_bytes(self) -> int:
        """Bytes of one cache block in a store node (every GPU's share of it)."""
        profile = self.profile
        return self.cache_block_tokens * profile.kv_bytes_per_token * profile.tensor_parallel

    def setup(self, name: str) -> Setup:
        for setup in self.setups:
            if setup.name == name:
                return setup
        raise KeyError(name)


def _transfer(value: Any, what: str) -> TransferCoefficients:
    if not isinstance(value, Mapping) or set(value) != {"latency", "bandwidth"}:
        raise ValueError(f"{what}: give latency (e.g. 10us) and bandwidth (bytes/s, e.g. 25GB)")
    return TransferCoefficients(
        parse_duration(str(value["latency"])),
        float(parse_size(str(value["bandwidth"]))),
    )


_SETUP_KEYS = {
    "name", "policy", "shape", "prefill_gpus", "pool", "local_prefill_threshold_tokens",
    "conditional_disaggregation", "local_fallback", "baseline", "kv_load", "kv_save",
    "decode_gpus", "planner",
}  # fmt: skip


def _flag(value: Any, what: str) -> bool:
    """A YAML boolean (``bool("false")`` would be True: a string is refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


def _setup(s: Any) -> Setup:
    if not isinstance(s, Mapping):
        raise ValueError("each setup is a mapping")
    where = f"setup {s.get('name', '?')}"
    unknown = set(s) - _SETUP_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    return Setup(
        name=str(s["name"]),
        policy=str(s["policy"]),
        shape=Shape(s["shape"]),
        prefill_gpus=int(s.get("prefill_gpus", 0)),
        pool=_flag(s.get("pool", True), f"{where}: pool"),
        local_prefill_threshold_tokens=int(s.get("local_prefill_threshold_tokens", 512)),
        conditional_disaggregation=_flag(
            s.get("conditional_disaggregation", True), f"{where}: conditional_disaggregation"
        ),
        local_fallback=_flag(s.get("local_fallback", False), f"{where}: local_fallback"),
        baseline=_flag(s.get("baseline", True), f"{where}: baseline"),
        kv_load=Timing(s.get("kv_load", "async")),
        kv_save=Timing(s.get("kv_save", "async")),
        decode_gpus=int(s.get("decode_gpus", 0)),
        planner=str(s["planner"]) if s.get("planner") is not None else None,
    )


def _planning(value: Any) -> PlanningSettings:
    if not isinstance(value, Mapping):
        raise ValueError("planner: give interval, engine_start and scale_down_after")
    unknown = set(value) - {"interval", "engine_start", "scale_down_after"}
    if unknown:
        raise ValueError(f"planner: unknown fields {sorted(unknown)}")
    return PlanningSettings(
        interval_s=parse_duration(str(value.get("interval", "60s"))),
        engine_start_s=parse_duration(str(value.get("engine_start", "60s"))),
        scale_down_after=int(value.get("scale_down_after", 3)),
    )


def _replay(value: Any) -> ReplayScale:
    if not isinstance(value, Mapping) or set(value) - {"block_tokens", "max_output_tokens"}:
        raise ValueError("replay: a mapping of block_tokens (16) and max_output_tokens (64)")
    return ReplayScale(
        block_tokens=int(value.get("block_tokens", 16)),
        max_output_tokens=int(value.get("max_output_tokens", 64)),
    )


_TOP_KEYS = {
    "name", "profile", "gpus", "gpus_per_host", "network", "transfers", "ssd_read", "store",
    "cache_block_tokens", "kv_block_tokens", "gateway_overhead", "slo", "setups", "strata_setup",
    "rates", "trace", "num_requests", "rate_profile", "planner", "replay",
}  # fmt: skip


def config_from_mapping(data: Mapping[str, Any], base: Path, origin: str) -> SimConfig:
    """A :class:`SimConfig` from a config file's mapping (paths relative to ``base``)."""
    try:
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        profile = load_profile(base / str(data["profile"]))
        transfers = dict(PRIOR_TRANSFERS)
        for name, value in dict(data.get("transfers", {})).items():
            transfers[Transport(name)] = _transfer(value, f"transfers.{name}")
        store = dict(data["store"])
        setups = tuple(_setup(s) for s in data["setups"])
        slo = dict(data["slo"])
        trace = data.get("trace")
        return SimConfig(
            name=str(data["name"]),
            profile=profile,
            gpus=int(data["gpus"]),
            gpus_per_host=int(data.get("gpus_per_host", 8)),
            network=Transport(data.get("network", "rdma")),
            transfers=MappingProxyType(transfers),
            ssd_read=(
                _transfer(data["ssd_read"], "ssd_read") if "ssd_read" in data else PRIOR_SSD_READ
            ),
            store=StoreConfig(
                dram_bytes=parse_size(str(store["dram"])),
                ssd_bytes=parse_size(str(store.get("ssd", 0))),
                eviction_policy=PolicyKind(store.get("eviction_policy", "lru")),
            ),
            cache_block_tokens=int(data.get("cache_block_tokens", 512)),
            kv_block_tokens=int(data.get("kv_block_tokens", 16)),
            gateway_overhead_s=parse_duration(str(data.get("gateway_overhead", "2ms"))),
            ttft_slo_s=parse_duration(str(slo["ttft"])),
            tpot_slo_s=parse_duration(str(slo["tpot"])),
            setups=setups,
            strata_setup=str(data["strata_setup"]),
            rates=tuple(float(r) for r in data["rates"]),
            trace=(base / str(trace)) if trace is not None else None,
            num_requests=int(data.get("num_requests", 0)),
            rate_profile=tuple(
                (float(parse_duration(str(t))), float(m)) for t, m in data.get("rate_profile", [])
            ),
            planning=_planning(data.get("planner", {})),
            replay=_replay(data["replay"]) if "replay" in data else None,
        )
    except KeyError as exc:
        raise ValueError(f"{origin}: missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{origin}: {exc}") from None


def load_config(path: Path) -> SimConfig:
    return config_from_mapping(read_mapping(path, "config"), path.parent, str(path))
