"""The prefill-to-decode hint of where the blocks are (dataplane/kv_hint.py), without vLLM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from dataplane.kv_hint import KV_NODE_PARAM, NODE_ID_REFRESH_S, StoreNodeId, hint_of
from kvstore.errors import KVStoreUnavailable
from tests.fakes import FakeClock


@pytest.mark.parametrize(
    ("params", "hint"),
    [
        ({KV_NODE_PARAM: "store-a"}, "store-a"),
        ({KV_NODE_PARAM: "x" * 255}, "x" * 255),
        ({KV_NODE_PARAM: "x" * 256}, None),  # no frame carries it: no hint, not an error
        ({KV_NODE_PARAM: "ä" * 128}, None),  # 256 bytes of UTF-8
        ({KV_NODE_PARAM: ""}, None),
        ({KV_NODE_PARAM: 7}, None),
        ({"other": "store-a"}, None),
        (None, None),
    ],
)
def test_hint_of_a_requests_params(params: Mapping[str, Any] | None, hint: str | None) -> None:
    assert hint_of(params) == hint


class FakeStore:
    """Answers STATS with ``replies`` in turn (an exception is raised); counts the calls."""

    def __init__(self, *replies: Mapping[str, Any] | Exception) -> None:
        self.replies = list(replies)
        self.calls = 0

    def stats(self) -> Mapping[str, Any]:
        reply = self.replies[min(self.calls, len(self.replies) - 1)]
        self.calls += 1
        if isinstance(reply, Exception):
            raise reply
        return reply


def test_the_node_id_is_read_once_per_refresh_period() -> None:
    store = FakeStore({"cluster": {"node_id": "A"}}, {"cluster": {"node_id": "A2"}})
    clock = FakeClock(50.0)
    node_id = StoreNodeId(store.stats, clock)
    assert [node_id.get(), node_id.get()] == ["A", "A"]
    assert store.calls == 1
    clock.now += NODE_ID_REFRESH_S - 0.001
    assert node_id.get() == "A"
    clock.now += 0.001
    assert node_id.get() == "A2"  # a node restarted under another id
    assert store.calls == 2


def test_a_standalone_node_gives_no_hint() -> None:
    store = FakeStore({"cluster": None})
    assert StoreNodeId(store.stats, FakeClock(50.0)).get() is None
    assert (
        StoreNodeId(FakeStore({"num_blocks": 3}).stats, FakeClock(50.0)).get() is None
    )  # older node


def test_a_failed_stats_keeps_the_last_id_and_is_not_retried_at_once() -> None:
    store = FakeStore(KVStoreUnavailable("down"), {"cluster": {"node_id": "B"}})
    clock = FakeClock(50.0)
    node_id = StoreNodeId(store.stats, clock)
    assert node_id.get() is None
    assert node_id.get() is None  # no second STATS within the period: the scheduler waits
    assert store.calls == 1
    clock.now += NODE_ID_REFRESH_S
    assert node_id.get() == "B"
    store.replies.append(KVStoreUnavailable("down again"))
    store.calls = 2
    clock.now += NODE_ID_REFRESH_S
    assert node_id.get() == "B"  # the last id read
