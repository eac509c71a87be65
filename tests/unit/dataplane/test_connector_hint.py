"""StrataConnector's scheduler side passes the hint through, without an engine.

The connector is built around a fake store client (``__new__`` and the scheduler side's fields:
vLLM's config object is not needed for these methods); requests are plain objects with the
fields vLLM's ``Request`` gives the connector.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from dataplane.connector import ConnectorSettings, StrataConnector
from dataplane.kv_hint import KV_NODE_PARAM, StoreNodeId
from kvstore.blocks.hashing import block_hash_key

BLOCK_SIZE = 4


class FakeClient:
    def __init__(self, present: int, node_id: str | None) -> None:
        self.present = present
        self.node_id = node_id
        self.matches: list[tuple[int, str | None]] = []
        self.num_stats = 0

    def match_prefix(self, keys: Sequence[bytes], *, hint: str | None = None) -> int:
        self.matches.append((len(keys), hint))
        return min(self.present, len(keys))

    def stats(self) -> dict[str, Any]:
        self.num_stats += 1
        return {"cluster": None if self.node_id is None else {"node_id": self.node_id}}


def connector(kv_role: str, client: FakeClient) -> StrataConnector:
    conn = StrataConnector.__new__(StrataConnector)
    conn._settings = ConnectorSettings(
        store_endpoint="127.0.0.1:1",
        model_fingerprint=bytes(16),
        can_load=kv_role in ("kv_consumer", "kv_both"),
        can_save=kv_role in ("kv_producer", "kv_both"),
    )
    conn._block_size = BLOCK_SIZE
    conn._layout = "cpu/L1/H1/D32/B4/auto/torch.float32"
    conn._hash_key = block_hash_key(None)
    conn._client = client  # type: ignore[assignment]
    conn._requests = {}
    conn._roots = {}
    conn._node_id = StoreNodeId(client.stats)
    return conn


def request(params: dict[str, Any] | None, num_tokens: int = 4 * BLOCK_SIZE + 1) -> Any:
    return SimpleNamespace(
        request_id="r1",
        prompt_token_ids=list(range(num_tokens)),
        cache_salt=None,
        kv_transfer_params=params,
    )


@pytest.mark.parametrize(
    ("params", "hint"),
    [({KV_NODE_PARAM: "store-a"}, "store-a"), (None, None), ({KV_NODE_PARAM: ""}, None)],
)
def test_a_decodes_match_carries_the_requests_hint(
    params: dict[str, Any] | None, hint: str | None
) -> None:
    client = FakeClient(present=3, node_id="store-b")
    conn = connector("kv_consumer", client)
    req = request(params)
    conn.on_new_request(req)
    assert conn.get_num_new_matched_tokens(req, 0) == (3 * BLOCK_SIZE, False)
    assert client.matches == [(4, hint)]  # 4 full blocks, the last prompt token computed
    _, finished = conn.request_finished(req, [])
    assert finished is not None and KV_NODE_PARAM not in finished  # a loader reports none


def test_a_prefill_reports_its_store_nodes_id() -> None:
    client = FakeClient(present=0, node_id="store-a")
    conn = connector("kv_producer", client)
    for _ in range(3):
        req = request(None)
        conn.on_new_request(req)
        _, params = conn.request_finished(req, [])
        assert params is not None and params[KV_NODE_PARAM] == "store-a"
    assert client.num_stats == 1  # read once, kept
    assert client.matches == []  # a producer never matches


def test_a_standalone_store_node_gives_no_hint() -> None:
    conn = connector("kv_producer", FakeClient(present=0, node_id=None))
    req = request(None)
    conn.on_new_request(req)
    _, params = conn.request_finished(req, [])
    assert params is not None and KV_NODE_PARAM not in params
