"""StrataConnector: vLLM's KV connector; saves and loads whole KV blocks through the Strata store.

vLLM builds the connector twice (vllm/distributed/kv_transfer/kv_connector/v1/base.py): once with
role SCHEDULER inside the engine-core process and once with role WORKER next to the model runner.
Only a `StrataConnectorMetadata` object crosses from the first to the second, once per engine step.

Call sequence for one request (prefill role saves, decode role loads; `kv_both` does both):

  scheduler side                                  worker side
  --------------                                  -----------
  on_new_request         hash the prompt into block keys (kvstore.blocks.hashing,
                         namespace = cache_salt)
  get_num_new_matched_tokens
                         ask the store how many leading keys it holds (loaders only), passing the
                         request's hint of which store node holds them (kv_transfer_params, see
                         dataplane/kv_hint.py); leave at least one prompt token to compute, as
                         vLLM requires
  update_state_after_alloc
                         remember (key, block id) pairs to load
  build_connector_meta   every step: loads planned above, and saves of the prompt's full blocks
                         that this step finishes computing (chunked prefill finishes them over
                         several steps)
                                       ─────▶ start_load_kv: fetch blocks into the paged cache
                                              before the forward pass
                                              wait_for_save: after the forward pass, gather each
                                              finished block from every layer, put it to the store
  update_connector_output
                         after the step: blocks whose load failed (the worker side's
                         get_block_ids_with_load_errors) no longer count as loaded
  request_finished       report block keys, the number of loaded tokens and of tokens whose load
                         failed (vLLM recomputed them) as kv_transfer_params; a saver also
                         reports its store node's cluster id (the decode's hint)

A stored block holds one engine block of every layer: shape [num_layers, *per-layer block shape].
Loading is synchronous (CPU engines gain nothing from layer pipelining); a block that cannot be
fetched is reported through `get_block_ids_with_load_errors`, and vLLM recomputes it
(kv_load_failure_policy="recompute") — the store is a cache, so a miss is never an error.

Configuration comes from `kv_connector_extra_config` (see `ConnectorSettings`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.logger import init_logger

from dataplane.counters import KV_COUNTERS
from dataplane.kv_hint import KV_NODE_PARAM, StoreNodeId, hint_of
from kvstore.blocks.hashing import block_hash_key, block_keys, root_key
from kvstore.client.sync import KVStoreClient
from kvstore.errors import KVStoreError
from kvstore.wire.types import PutStatus
from strata_common.credentials import ClusterCredentials, Identity, read_cluster_key
from strata_common.heap import HeapTrimmer
from strata_common.tls import TlsConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)  # vLLM's logger: configured in the engine-core process too


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    """The connector's part of `kv_connector_extra_config`, validated once."""

    store_endpoint: str
    model_fingerprint: bytes
    can_load: bool
    can_save: bool
    credentials: ClusterCredentials | None = None
    """What the connector proves itself with to the store node (the worker's cluster key file
    and identity), or None."""
    heap_trim_interval_s: float = 0.0
    """How often the model runner returns its freed heap to the system (strata_common/heap.py)."""

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig) -> ConnectorSettings:
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        extra = ktc.kv_connector_extra_config or {}
        endpoint = extra.get("store_endpoint")
        fingerprint = extra.get("model_fingerprint")
        if not isinstance(endpoint, str) or not endpoint:
            raise ValueError("StrataConnector needs kv_connector_extra_config['store_endpoint']")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("StrataConnector needs kv_connector_extra_config['model_fingerprint']")
        credentials = None
        key_file, identity = extra.get("cluster_key_file"), extra.get("identity")
        tls_files = [extra.get(f"tls_{name}") for name in ("cert", "key", "ca")]
        key = None if key_file is None else read_cluster_key(Path(str(key_file)))
        if any(tls_files):  # TLS mode: the worker's certificate (the key only for block keys)
            tls = TlsConfig(*tls_files)
            credentials = ClusterCredentials(key or b"", tls.check_role("worker"), tls=tls)
        elif key is not None:
            if not isinstance(identity, str):
                raise ValueError("StrataConnector's cluster_key_file needs an identity")
            credentials = ClusterCredentials(key, Identity.parse(identity))
        return cls(
            store_endpoint=endpoint,
            model_fingerprint=bytes.fromhex(fingerprint),
            can_load=ktc.kv_role in ("kv_consumer", "kv_both"),
            can_save=ktc.kv_role in ("kv_producer", "kv_both"),
            credentials=credentials,
            heap_trim_interval_s=float(extra.get("heap_trim_interval_s", 0.0)),
        )


def kv_layout_name(vllm_config: VllmConfig) -> str:
    """Names all that decides the bytes of a block, so blocks of another layout never match."""
    mc = vllm_config.model_config
    cc = vllm_config.cache_config
    pc = vllm_config.parallel_config
    return (
        f"{vllm_config.device_config.device_type}"
        f"/L{mc.get_num_layers(pc)}/H{mc.get_num_kv_heads(pc)}/D{mc.get_head_size()}"
        f"/B{cc.block_size}/{cc.cache_dtype}/{mc.dtype}"
    )


@dataclass(slots=True)
class BlockTransfer:
    """One batch of blocks of one request to move between the store and the paged cache."""

    request_id: str
    keys: list[bytes]
    block_ids: list[int]


_MAX_ROOTS = 4096
"""Namespaces (cache salts) whose root keys are memoized."""


@dataclass
class StrataConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)


class StrataConnectorStats(KVConnectorStats):
    """Counters from the worker side, summed by vLLM's stats pipeline into the frontend process."""

    FIELDS = KV_COUNTERS

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        super().__init__(data=dict(data) if data else {})
        for name in self.FIELDS:
            self.data.setdefault(name, 0)

    def reset(self) -> None:
        for name in self.FIELDS:
            self.data[name] = 0

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name in self.FIELDS:
            self.data[name] += other.data.get(name, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: self.data[name] for name in self.FIELDS}

    def is_empty(self) -> bool:
        return not any(self.data[name] for name in self.FIELDS)


@dataclass(slots=True)
class _RequestState:
    """Scheduler-side bookkeeping for one request."""

    keys: list[bytes]
    num_prompt_tokens: int
    kv_node: str | None = None  # the hint: the store node that holds the blocks (a prefill's)
    block_ids: list[int] = field(default_factory=list)
    num_local_tokens: int = 0  # prefix-cache hit inside the engine, block aligned
    num_external_tokens: int = 0  # tokens loaded from the store
    num_failed_tokens: int = 0  # tokens planned to load whose load failed (recomputed)
    num_saved_blocks: int = 0  # prompt blocks handed to the worker side for saving
    pending_load: BlockTransfer | None = None
    inflight_load: list[int] = field(default_factory=list)  # block ids loading this step


class StrataConnector(KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._settings = ConnectorSettings.from_vllm(vllm_config)
        self._block_size = vllm_config.cache_config.block_size
        self._layout = kv_layout_name(vllm_config)
        self._client = KVStoreClient(
            self._settings.store_endpoint, credentials=self._settings.credentials
        )
        credentials = self._settings.credentials
        self._hash_key = block_hash_key(credentials.key or None if credentials else None)
        # Scheduler side.
        self._requests: dict[str, _RequestState] = {}
        self._roots: dict[str, bytes] = {}
        self._node_id = StoreNodeId(self._client.stats)
        # Worker side.
        self._layers: list[torch.Tensor] = []
        self._stats = StrataConnectorStats()
        self._stats_lock = threading.Lock()
        self._failed_block_ids: set[int] = set()
        self._staging: torch.Tensor | None = None
        self._heap = HeapTrimmer(self._settings.heap_trim_interval_s)

    # ------------------------------------------------------------------ scheduler side

    def _root(self, namespace: str) -> bytes:
        root = self._roots.get(namespace)
        if root is None:
            if len(self._roots) >= _MAX_ROOTS:  # salts are client-chosen: bound the memo
                self._roots.clear()
            root = root_key(
                self._settings.model_fingerprint, self._layout, namespace, self._hash_key
            )
            self._roots[namespace] = root
        return root

    def on_new_request(self, request: Request) -> None:
        prompt = list(request.prompt_token_ids or [])
        root = self._root(request.cache_salt or "")
        keys = block_keys(prompt, self._block_size, root, self._hash_key)
        self._requests[request.request_id] = _RequestState(
            keys=keys, num_prompt_tokens=len(prompt), kv_node=hint_of(request.kv_transfer_params)
        )

    def _state(self, request: Request) -> _RequestState:
        state = self._requests.get(request.request_id)
        if state is None:  # requests added before the connector saw them (e.g. after a reset)
            self.on_new_request(request)
            state = self._requests[request.request_id]
        return state

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        state = self._state(request)
        state.num_local_tokens = num_computed_tokens
        if not self._settings.can_load:
            return 0, False
        # vLLM must compute at least one prompt token itself to produce logits.
        max_blocks = (state.num_prompt_tokens - 1) // self._block_size
        first = num_computed_tokens // self._block_size
        if max_blocks <= first:
            return 0, False
        try:
            num_present = self._client.match_prefix(state.keys[:max_blocks], hint=state.kv_node)
        except KVStoreError as exc:
            logger.warning("store unavailable for lookup, computing instead: %s", exc)
            return 0, False
        return max(0, num_present * self._block_size - num_computed_tokens), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        state = self._state(request)
        state.block_ids = list(blocks.get_block_ids()[0])
        state.num_external_tokens = num_external_tokens
        if num_external_tokens <= 0:
            return
        first = state.num_local_tokens // self._block_size
        last = (state.num_local_tokens + num_external_tokens) // self._block_size
        state.pending_load = BlockTransfer(
            request_id=request.request_id,
            keys=state.keys[first:last],
            block_ids=state.block_ids[first:last],
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = StrataConnectorMetadata()
        for new_req in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new_req.req_id)
            if state is None:
                continue
            state.block_ids = list(new_req.block_ids[0])
            if state.pending_load is not None:
                meta.loads.append(state.pending_load)
                state.inflight_load = list(state.pending_load.block_ids)
                state.pending_load = None
            # Blocks loaded from the store or found in the engine's prefix cache are already there.
            state.num_saved_blocks = new_req.num_computed_tokens // self._block_size
            self._plan_save(
                meta,
                new_req.req_id,
                state,
                new_req.num_computed_tokens,
                scheduler_output.num_scheduled_tokens.get(new_req.req_id, 0),
            )

        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                # Preempted and resumed: vLLM gave it a fresh block list.
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
                if state.pending_load is not None:
                    meta.loads.append(state.pending_load)
                    state.inflight_load = list(state.pending_load.block_ids)
                    state.pending_load = None
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            self._plan_save(
                meta,
                req_id,
                state,
                cached.num_computed_tokens[i],
                scheduler_output.num_scheduled_tokens.get(req_id, 0),
            )
        return meta

    def _plan_save(
        self,
        meta: StrataConnectorMetadata,
        req_id: str,
        state: _RequestState,
        num_computed: int,
        num_scheduled: int,
    ) -> None:
        """Save the prompt's full blocks that this step finishes computing."""
        if not self._settings.can_save:
            return
        done_tokens = min(num_computed + num_scheduled, state.num_prompt_tokens)
        done_blocks = min(done_tokens // self._block_size, len(state.keys), len(state.block_ids))
        if done_blocks <= state.num_saved_blocks:
            return
        first = state.num_saved_blocks
        meta.saves.append(
            BlockTransfer(
                request_id=req_id,
                keys=state.keys[first:done_blocks],
                block_ids=state.block_ids[first:done_blocks],
            )
        )
        state.num_saved_blocks = done_blocks

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Loads are synchronous, so a failed block was loading in the step just finished: from
        the first failed block on, the request's planned load was recomputed instead."""
        invalid = connector_output.invalid_block_ids
        for state in self._requests.values():
            if not state.inflight_load:
                continue
            loading, state.inflight_load = state.inflight_load, []
            if not invalid:
                continue
            first = next((i for i, b in enumerate(loading) if b in invalid), None)
            if first is not None:
                failed = (len(loading) - first) * self._block_size
                state.num_failed_tokens += failed
                state.num_external_tokens = max(0, state.num_external_tokens - failed)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False, None
        params: dict[str, Any] = {
            "strata_block_keys": [k.hex() for k in state.keys],
            "strata_num_external_tokens": state.num_external_tokens,
            "strata_num_failed_tokens": state.num_failed_tokens,
        }
        if self._settings.can_save and state.keys:  # where its blocks went: the decode's hint
            node_id = self._node_id.get()
            if node_id is not None:
                params[KV_NODE_PARAM] = node_id
        # Saves run synchronously inside the step, so the blocks can be freed right away.
        return False, params

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # Order layers by their index in the model so the stored block layout is stable.
        def layer_index(name: str) -> tuple[int, str]:
            digits = [int(p) for p in name.split(".") if p.isdigit()]
            return (digits[0] if digits else -1, name)

        names = sorted(kv_caches, key=layer_index)
        self._layers = [kv_caches[name] for name in names]
        first = self._layers[0]
        logger.info(
            "StrataConnector: %d layers, per-layer cache %s %s, layout %s",
            len(self._layers),
            tuple(first.shape),
            first.dtype,
            self._layout,
        )

    def _block_shape(self) -> tuple[int, ...]:
        return (len(self._layers), *self._layers[0].shape[1:])

    def _staging_for(self, num_blocks: int) -> torch.Tensor:
        """A reusable buffer of whole stored blocks (new memory is slow to fault in here)."""
        if self._staging is None or self._staging.shape[0] < num_blocks:
            capacity = max(num_blocks, 8)
            self._staging = torch.empty(
                (capacity, *self._block_shape()), dtype=self._layers[0].dtype
            )
        return self._staging[:num_blocks]

    @staticmethod
    def _as_bytes(block: torch.Tensor) -> memoryview:
        return memoryview(block.view(torch.uint8).numpy()).cast("B")

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, StrataConnectorMetadata)
        for load in meta.loads:
            self._load(load)

    def _load(self, load: BlockTransfer) -> None:
        t0 = time.perf_counter()
        staging = self._staging_for(len(load.keys))
        outs = [self._as_bytes(staging[i]) for i in range(len(load.keys))]
        try:
            sizes = self._client.get_many_into(load.keys, outs)
        except KVStoreError as exc:
            logger.warning("load of %d blocks failed, recomputing: %s", len(load.keys), exc)
            sizes = [None] * len(load.keys)
        expected = outs[0].nbytes if outs else 0
        good = [i for i, n in enumerate(sizes) if n == expected]
        # A gap breaks the prefix: blocks after a missing one are recomputed as well.
        num_good = 0
        while num_good < len(good) and good[num_good] == num_good:
            num_good += 1
        for i, block_id in enumerate(load.block_ids[:num_good]):
            for layer_idx, layer in enumerate(self._layers):
                layer[block_id].copy_(staging[i, layer_idx])
        failed = load.block_ids[num_good:]
        self._failed_block_ids.update(failed)
        with self._stats_lock:
            self._stats.data["blocks_loaded"] += num_good
            self._stats.data["bytes_loaded"] += num_good * expected
            self._stats.data["load_failures"] += len(failed)
            self._stats.data["load_time_s"] += time.perf_counter() - t0

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        # Blocks are saved whole, across all layers, in wait_for_save once the forward pass is done.
        return

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, StrataConnectorMetadata)
        for save in meta.saves:
            self._save(save)
        trimmed = self._heap.maybe_trim()  # the forward pass is done: none waits on malloc
        if trimmed is not None:
            with self._stats_lock:
                self._stats.data["heap_trims"] += 1
                self._stats.data["heap_trimmed_bytes"] += trimmed.released_bytes
                self._stats.data["heap_trim_time_s"] += trimmed.duration_s

    def _save(self, save: BlockTransfer) -> None:
        t0 = time.perf_counter()
        staging = self._staging_for(len(save.keys))
        for i, block_id in enumerate(save.block_ids):
            for layer_idx, layer in enumerate(self._layers):
                staging[i, layer_idx].copy_(layer[block_id])
        items = [(key, self._as_bytes(staging[i])) for i, key in enumerate(save.keys)]
        try:
            results = self._client.put_many(items)
            num_ok = sum(1 for r in results if r in (PutStatus.OK, PutStatus.EXISTS))
            failures = len(items) - num_ok
        except KVStoreError as exc:
            logger.warning("save of %d blocks failed: %s", len(items), exc)
            num_ok, failures = 0, len(items)
        with self._stats_lock:
            self._stats.data["blocks_saved"] += num_ok
            self._stats.data["bytes_saved"] += num_ok * (items[0][1].nbytes if items else 0)
            self._stats.data["save_failures"] += failures
            self._stats.data["save_time_s"] += time.perf_counter() - t0

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        with self._stats_lock:
            if self._stats.is_empty():
                return None
            out, self._stats = self._stats, StrataConnectorStats()
        return out

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return StrataConnectorStats(data) if data is not None else StrataConnectorStats()

    def shutdown(self) -> None:
        self._client.close()
