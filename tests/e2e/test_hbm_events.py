"""HBM events end to end: a real worker (one vLLM engine, the tiny model) publishes the blocks of
its prefix cache to a real Valkey server; a ClusterView shows (instance, HBM) for exactly the
Strata keys of the prompt's full blocks -- the keys the connector saved to the store -- and forgets
them when the worker stops."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.blocks.tier import Tier
from kvstore.client.sync import KVStoreClient
from kvstore.cluster.events import BlocksStored, SourceCleared, decode_event
from kvstore.cluster.view import ClusterView
from kvstore.metadata import START, RedisMetadataStore
from tests.e2e.dataplane_processes import Process, decode, prefill, start_store, start_worker, stub
from tests.integration.kvstore.valkey_fixture import valkey_url  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

BLOCK_SIZE = 128  # vLLM's CPU block size
PROMPT = [random.Random(3).randrange(10, 2000) for _ in range(3 * BLOCK_SIZE + 10)]


@pytest.fixture
def store() -> Iterator[Process]:
    node = start_store()
    yield node
    node.stop()


def stream_events(url: str) -> list[object]:
    meta = RedisMetadataStore(url)
    try:
        _cursor, messages = meta.read(START, 0.01, count=100_000)
    finally:
        meta.close()
    return [decode_event(m) for m in messages]


def test_engine_blocks_appear_as_hbm_holders_and_leave_with_the_worker(
    tiny_model_dir: Path,
    store: Process,
    valkey_url: str,  # noqa: F811
) -> None:
    worker = start_worker(tiny_model_dir, "both", store.endpoint, "--kv-metadata", valkey_url)
    instance = worker.endpoint  # the default instance id is the worker's HOST:PORT
    view = ClusterView(RedisMetadataStore(valkey_url), poll_interval_s=0.05).start()
    try:
        rpc = stub(worker.endpoint)
        keys = list(prefill(rpc, PROMPT).block_keys)
        assert len(keys) == 3  # the prompt's full blocks; the 10-token tail has no key

        def holds_exactly(expected: list[bytes]) -> bool:
            return view.num_blocks() == len(expected) and all(
                view.holders(k) == [(instance, Tier.HBM)] for k in expected
            )

        assert view.wait_for(lambda v: holds_exactly(keys), timeout_s=30), worker.tail()
        with KVStoreClient(store.endpoint) as client:
            assert client.match_prefix(keys) == 3  # the same keys the connector saved

        # The same prompt again is a prefix-cache hit: nothing new is cached, nothing published.
        tokens, last = decode(rpc, PROMPT, 4)
        assert len(tokens) == 4 and last.num_cached_tokens == 3 * BLOCK_SIZE
        # Another tenant's cache salt gives another key space, in HBM as well.
        salted = list(prefill(rpc, PROMPT, cache_salt="tenant-a").block_keys)
        assert len(salted) == 3 and not set(salted) & set(keys)
        assert view.wait_for(lambda v: holds_exactly(keys + salted), timeout_s=30), worker.tail()
    finally:
        status = worker.stop()
    try:
        assert status == 0, worker.tail()
        assert view.wait_for(lambda v: v.num_blocks() == 0, timeout_s=30)
        assert view.holders(keys[0]) == []
    finally:
        view.stop()

    events = stream_events(valkey_url)
    assert all(e.source == instance for e in events)  # type: ignore[attr-defined]
    assert events[0] == SourceCleared(instance, 0)
    assert isinstance(events[-1], SourceCleared)
    announced = [k for e in events if isinstance(e, BlocksStored) for k in e.keys]
    assert announced == keys + salted
    assert all(e.tier is Tier.HBM for e in events if isinstance(e, BlocksStored))
