"""The hint of where a prompt's KV blocks are, from a prefill to its decode (multihost.md §2).

The prefill's connector learns the cluster node id of its store node (STATS ``cluster.node_id``;
none for a standalone node) and reports it in the request's ``kv_transfer_params``
(:data:`KV_NODE_PARAM`); the worker returns it as ``PrefillResponse.kv_node``, the gateway passes
it to the decode as ``DecodeRequest.kv_node``, the decode worker puts it into the request's
``kv_transfer_params`` and the decode's connector passes it to its own node's MATCH_PREFIX.
Light on purpose (no vLLM, no torch): the worker's gRPC handlers and the tests import it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from kvstore.errors import KVStoreError
from kvstore.wire.messages import MAX_HINT_BYTES

__all__ = ["KV_NODE_PARAM", "NODE_ID_REFRESH_S", "StoreNodeId", "hint_of"]

KV_NODE_PARAM = "strata_kv_node"
"""The key of the hint in a request's ``kv_transfer_params`` (both ways: the prefill's connector
reports it, the decode's reads it)."""
NODE_ID_REFRESH_S = 30.0
"""How long the connector trusts the node id it read (a node restarted under another id is seen
within this long); also how long it waits after a failed STATS before asking again."""


def hint_of(params: Mapping[str, Any] | None) -> str | None:
    """The node id a request's ``kv_transfer_params`` names, if it is one a frame can carry
    (1..255 bytes of UTF-8); None otherwise (no hint: the match is what it always was)."""
    value = (params or {}).get(KV_NODE_PARAM)
    if not isinstance(value, str) or not 0 < len(value.encode()) <= MAX_HINT_BYTES:
        return None
    return value


class StoreNodeId:
    """The cluster node id of the connector's store node, read from its STATS and kept for
    :data:`NODE_ID_REFRESH_S`; None for a standalone node or while its STATS fails. ``stats``
    is the store client's ``stats`` (one round trip, on the caller's thread: at most once per
    refresh period, failed or not)."""

    def __init__(
        self,
        stats: Callable[[], Mapping[str, Any]],
        clock: Callable[[], float] = time.monotonic,
        refresh_s: float = NODE_ID_REFRESH_S,
    ) -> None:
        self._stats = stats
        self._clock = clock
        self._refresh_s = refresh_s
        self._node_id: str | None = None
        self._read_at: float | None = None

    def get(self) -> str | None:
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self._refresh_s:
            self._read_at = now
            try:
                cluster = self._stats().get("cluster")
            except KVStoreError:
                return self._node_id  # the last id read, if any: the node is likely the same
            node_id = cluster.get("node_id") if isinstance(cluster, Mapping) else None
            self._node_id = hint_of({KV_NODE_PARAM: node_id})
        return self._node_id
