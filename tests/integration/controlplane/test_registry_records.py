"""The shared registry's records are input: in a real Valkey, records that anyone with write
access to it could have written (not JSON, wrong types, a hostile endpoint, a record stored under
another id; with the cluster key, a record without a MAC, under another key, moved or altered)
are skipped and logged once each; the good records load, every round (docs/design/security.md
§5.2)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis

from controlplane.instances.store import (
    InstanceRecord,
    RedisRegistryStore,
    RegistryStoreError,
    open_registry_store,
)
from controlplane.workers.roles import WorkerRole
from strata_common.records import RecordSeal
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
    skipped = [
        r.getMessage() for r in caplog.records if "skipping the registry record" in r.getMessage()
    ]
    assert len(skipped) == len(BAD) + 1, skipped  # once per record and reason, not per round
    assert any("stored under b'w93'" in line for line in skipped)
    assert any("w90" in line and "bad id None" in line for line in skipped)


KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
INSTANCES = "mac-test:registry:instances"


def _skipped_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if "skipping the registry record" in r.getMessage()
    ]


def test_with_keys_on_both_sides_the_registry_works_as_before(valkey_url: str) -> None:
    async def scenario() -> None:
        a = RedisRegistryStore(valkey_url, namespace="mac-test", cluster_key=KEY)
        b = RedisRegistryStore(valkey_url, namespace="mac-test", cluster_key=KEY)
        try:
            w1, created = await a.register(WorkerRole.DECODE, "127.0.0.1:7001", launched=True)
            assert created and w1 == InstanceRecord(
                "w1", WorkerRole.DECODE, "127.0.0.1:7001", launched=True
            )
            again, created = await b.register(WorkerRole.DECODE, "127.0.0.1:7001", launched=False)
            assert again == w1 and not created  # the other gateway gets the same record
            w2, _ = await b.register(WorkerRole.PREFILL, "127.0.0.1:7002", launched=False)
            assert w2.id == "w2"
            drained = InstanceRecord(w1.id, w1.role, w1.endpoint, draining=True, launched=True)
            assert await b.update(drained)
            assert await a.load() == {"w1": drained, "w2": w2}
            raw = redis.Redis.from_url(valkey_url)
            stored = raw.hget(INSTANCES, "w1")
            raw.close()
            assert stored == RecordSeal(KEY).seal((INSTANCES, "w1"), drained.to_json())
            await a.delete("w1")  # a sealed record's endpoint index entry goes with it
            assert await b.load() == {"w2": w2}
            w3, created = await b.register(WorkerRole.DECODE, "127.0.0.1:7001", launched=False)
            assert created and w3.id == "w3"
            assert not await a.update(drained)  # deleted: no resurrection
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_forged_records_are_skipped_and_logged_once(
    valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = InstanceRecord("w1", WorkerRole.DECODE, "127.0.0.1:7001")
    drained = InstanceRecord("w1", WorkerRole.DECODE, "127.0.0.1:7001", draining=True)
    fake = InstanceRecord("w9", WorkerRole.DECODE, "10.6.6.6:5000")
    w1_sealed = RecordSeal(KEY).seal((INSTANCES, "w1"), drained.to_json())
    forged = {
        b"w9": fake.to_json().encode(),  # no MAC
        b"w8": RecordSeal(OTHER_KEY).seal((INSTANCES, "w8"), fake.to_json().replace("w9", "w8")),
        b"w7": w1_sealed,  # a valid record copied under another id
        b"w6": RecordSeal(KEY)
        .seal((INSTANCES, "w6"), fake.to_json().replace("w9", "w6"))
        .replace(b"10.6.6.6", b"10.6.6.7"),  # a field altered after sealing
        b"w5": RecordSeal(KEY).seal(("elsewhere:registry:instances", "w5"), b"{}"),
    }

    async def scenario() -> list[dict[str, InstanceRecord]]:
        store = RedisRegistryStore(valkey_url, namespace="mac-test", cluster_key=KEY)
        try:
            record, _ = await store.register(WorkerRole.DECODE, "127.0.0.1:7001", launched=False)
            assert record == good
            raw = redis.Redis.from_url(valkey_url)
            raw.hset(INSTANCES, mapping=forged)
            rounds = [await store.load() for _ in range(3)]
            raw.hset(INSTANCES, b"w9", fake.to_json().encode() + b" ")  # same reason: quiet
            rounds.append(await store.load())
            raw.close()
            return rounds
        finally:
            await store.close()

    with caplog.at_level(logging.WARNING, logger="controlplane.instances.store"):
        rounds = asyncio.run(scenario())
    assert rounds == [{"w1": good}] * 4
    assert sorted(_skipped_lines(caplog)) == [
        "skipping the registry record under b'w5': instance record: wrong MAC (another cluster "
        "key, altered, or moved from another key or id)",
        "skipping the registry record under b'w6': instance record: wrong MAC (another cluster "
        "key, altered, or moved from another key or id)",
        "skipping the registry record under b'w7': instance record: wrong MAC (another cluster "
        "key, altered, or moved from another key or id)",
        "skipping the registry record under b'w8': instance record: wrong MAC (another cluster "
        "key, altered, or moved from another key or id)",
        "skipping the registry record under b'w9': instance record: no MAC (written without the "
        "cluster key?)",
    ]


def test_registration_replaces_a_forged_index_entry_or_record(
    valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        store = RedisRegistryStore(valkey_url, namespace="mac-test", cluster_key=KEY)
        plain = RedisRegistryStore(valkey_url, namespace="mac-test")
        raw = redis.Redis.from_url(valkey_url)
        try:
            w1, _ = await store.register(WorkerRole.DECODE, "127.0.0.1:7001", launched=False)
            # the unsealed index points a new endpoint at w1's (valid) record: not w1's endpoint
            raw.hset("mac-test:registry:endpoints", "127.0.0.1:7009", "w1")
            w2, created = await store.register(WorkerRole.DECODE, "127.0.0.1:7009", launched=False)
            assert created and w2 == InstanceRecord("w2", WorkerRole.DECODE, "127.0.0.1:7009")
            assert raw.hget("mac-test:registry:endpoints", "127.0.0.1:7009") == b"w2"
            # w1's record replaced by one without a MAC (pointing elsewhere)
            raw.hset(INSTANCES, "w1", w1.to_json().replace("7001", "6666"))
            w3, created = await store.register(WorkerRole.DECODE, "127.0.0.1:7001", launched=False)
            assert created and w3 == InstanceRecord("w3", WorkerRole.DECODE, "127.0.0.1:7001")
            assert await store.load() == {"w2": w2, "w3": w3}  # the forged w1 is skipped
            again, created = await store.register(
                WorkerRole.DECODE, "127.0.0.1:7001", launched=True
            )
            assert again == w3 and not created
            # a gateway without the key cannot check a sealed record: it refuses, replaces nothing
            with pytest.raises(RegistryStoreError, match="this process has none"):
                await plain.register(WorkerRole.DECODE, "127.0.0.1:7001", launched=False)
            assert raw.hget("mac-test:registry:endpoints", "127.0.0.1:7001") == b"w3"
            await store.delete("w1")  # a bad record can be deleted (its index entry is w3's)
            assert raw.hget("mac-test:registry:endpoints", "127.0.0.1:7001") == b"w3"
            await store.delete("w3")
            assert raw.hget("mac-test:registry:endpoints", "127.0.0.1:7001") is None
            raw.hset(INSTANCES, "w4", b"strata-mac1:not json")
            await store.delete("w4")
            assert raw.hkeys(INSTANCES) == [b"w2"]
        finally:
            raw.close()
            await store.close()
            await plain.close()

    with caplog.at_level(logging.WARNING, logger="controlplane.instances.store"):
        asyncio.run(scenario())
    replacing = [r.getMessage() for r in caplog.records if "replacing" in r.getMessage()]
    assert replacing == [
        "registry: replacing the record of 127.0.0.1:7009 under b'w1': the registry index maps "
        "127.0.0.1:7009 to w1, whose endpoint is 127.0.0.1:7001",
        "registry: replacing the record of 127.0.0.1:7001 under b'w1': instance record: no MAC "
        "(written without the cluster key?)",
    ]


def test_a_gateway_without_the_key_says_why_it_skips_sealed_records(
    valkey_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> tuple[dict[str, InstanceRecord], dict[str, InstanceRecord]]:
        sealed = RedisRegistryStore(valkey_url, namespace="mac-test", cluster_key=KEY)
        plain = RedisRegistryStore(valkey_url, namespace="mac-test")
        try:
            await sealed.register(WorkerRole.DECODE, "127.0.0.1:7001", launched=False)
            return await plain.load(), await sealed.load()
        finally:
            await sealed.close()
            await plain.close()

    with caplog.at_level(logging.WARNING, logger="controlplane.instances.store"):
        seen_plain, seen_sealed = asyncio.run(scenario())
    assert seen_plain == {} and list(seen_sealed) == ["w1"]
    assert _skipped_lines(caplog) == [
        "skipping the registry record under b'w1': instance record: sealed with a cluster key, "
        "but this process has none (--cluster-key-file)"
    ]


def test_the_gateway_opens_its_registry_with_its_cluster_key(valkey_url: str) -> None:
    async def scenario() -> bytes | None:
        store = open_registry_store(valkey_url, KEY)  # as controlplane/gateway.py does
        try:
            await store.register(WorkerRole.DECODE, "127.0.0.1:7001", launched=False)
        finally:
            await store.close()
        raw = redis.Redis.from_url(valkey_url)
        try:
            stored: bytes | None = raw.hget("strata:registry:instances", "w1")
            return stored
        finally:
            raw.close()

    record = InstanceRecord("w1", WorkerRole.DECODE, "127.0.0.1:7001")
    expected = RecordSeal(KEY).seal(("strata:registry:instances", "w1"), record.to_json())
    assert asyncio.run(scenario()) == expected
