"""The shared registry's records are input: in a real Valkey, records that anyone with write
access to it could have written (not JSON, wrong types, a hostile endpoint, a record stored under
another id) are skipped and logged once each; the good records load, every round."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis

from controlplane.instances.store import InstanceRecord, RedisRegistryStore
from controlplane.workers.roles import WorkerRole
from tests.integration.kvstore.valkey_fixture import valkey_url

__all__ = ["valkey_url"]

BAD = {
    b"w90": b"\x00\xff not json",
    b"w91": b'["a", "list"]',
    b"w92": b'{"id": "w92", "role": "decode", "endpoint": "evil:99999"}',
    b"w93": b'{"id": "w1", "role": "decode", "endpoint": "10.0.0.9:5000"}',  # under another id
    b"w94": b'{"id": "w94", "role": "decode", "endpoint": "10.0.0.9:5000", "draining": "yes"}',
}


def test_bad_records_are_skipped_and_logged_once(
    valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> list[dict[str, InstanceRecord]]:
        store = RedisRegistryStore(valkey_url, namespace="records-test")
        try:
            _, created = await store.register(WorkerRole.DECODE, "127.0.0.1:7001", launched=False)
            assert created
            raw = redis.Redis.from_url(valkey_url)
            raw.hset("records-test:registry:instances", mapping=BAD)
            rounds = [await store.load() for _ in range(3)]
            raw.hdel("records-test:registry:instances", b"w90")
            raw.hset("records-test:registry:instances", b"w90", b"{}")  # bad in a new way
            rounds.append(await store.load())
            raw.close()
            return rounds
        finally:
            await store.close()

    with caplog.at_level(logging.WARNING, logger="controlplane.instances.store"):
        rounds = asyncio.run(scenario())
    for loaded in rounds:
        assert list(loaded) == ["w1"]
        assert loaded["w1"] == InstanceRecord("w1", WorkerRole.DECODE, "127.0.0.1:7001")
    skipped = [r.getMessage() for r in caplog.records if "skipping the record" in r.getMessage()]
    assert len(skipped) == len(BAD) + 1, skipped  # once per record and reason, not per round
    assert any("stored under b'w93'" in line for line in skipped)
    assert any("w90" in line and "bad id None" in line for line in skipped)
