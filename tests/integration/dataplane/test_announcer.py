"""The worker's announcement loop (dataplane/announcer.py) against a real Valkey, without an
engine: it announces once started, each renewal restores the full TTL (so the key outlives its
TTL while the worker lives, and comes back after Redis lost it), a Redis outage is survived,
and stopping deletes the announcement — but never a successor's at the same endpoint.

The loop's waits are driven by the test (:class:`Ticks`), so nothing depends on timing."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import redis

from dataplane.announcer import AnnouncementLoop, announcement_loop
from dataplane.config import WorkerConfig, WorkerRole
from strata_common.announce import (
    AnnouncedRole,
    Announcement,
    AnnouncementReader,
    Announcer,
    open_announcement,
)
from strata_common.credentials import write_secret_file
from strata_common.records import RecordSeal
from tests.integration.kvstore.valkey_fixture import ValkeyServer, valkey_server

__all__ = ["valkey_server"]

KEY = bytes(range(32))
TTL_S = 10.0


class Ticks:
    """A ``sleep`` the test releases one call at a time."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self._go: asyncio.Queue[None] = asyncio.Queue()
        self._sleeping = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self._sleeping.set()
        await self._go.get()

    async def tick(self) -> None:
        """Let the loop run one renewal; returns once it waits again."""
        await self._sleeping.wait()
        self._sleeping.clear()
        self._go.put_nowait(None)
        await self._sleeping.wait()


def _config(tmp_path: Path, url: str, **kwargs: object) -> WorkerConfig:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return WorkerConfig(
        role=WorkerRole.PREFILL,
        model_dir=model,
        store_endpoint="127.0.0.1:1",
        announce=url,
        announce_interval_s=2.0,
        announce_ttl_s=TTL_S,
        **kwargs,  # type: ignore[arg-type]
    )


def _loop(config: WorkerConfig, port: int, ticks: Ticks, key: bytes | None) -> AnnouncementLoop:
    made = announcement_loop(config, port, key)
    assert made is not None
    interval_s = config.announce_interval_s
    return AnnouncementLoop(made.announcer, interval_s=interval_s, sleep=ticks.sleep)


def test_announce_renew_and_withdraw(tmp_path: Path, valkey_server: ValkeyServer) -> None:
    key_file = tmp_path / "cluster.key"
    write_secret_file(key_file, KEY.hex() + "\n")
    config = _config(tmp_path, valkey_server.url, cluster_key_file=key_file)
    raw = redis.Redis.from_url(valkey_server.url)
    name = b"strata:registry:announce:127.0.0.1:7001"

    async def scenario() -> None:
        ticks = Ticks()
        loop = _loop(config, 7001, ticks, KEY)
        await loop.start()
        stored = raw.get(name)
        assert stored is not None
        announcement = open_announcement(RecordSeal(KEY), name, stored)
        assert announcement == Announcement(
            "127.0.0.1:7001", AnnouncedRole.PREFILL, str(config.model_dir), announcement.boot
        )
        assert 0 < raw.pttl(name) <= TTL_S * 1000
        client = _aio(valkey_server.url)
        reader = AnnouncementReader(client, RecordSeal(KEY))
        assert await reader.read() == {"127.0.0.1:7001": announcement}

        # Renewals restore the TTL: a key about to expire lives on ...
        raw.pexpire(name, 50)
        await ticks.tick()
        assert TTL_S * 1000 - 5000 < raw.pttl(name) <= TTL_S * 1000
        # ... and one that Redis lost (expired, a Redis restarted empty) comes back.
        raw.delete(name)
        await ticks.tick()
        assert raw.get(name) == stored
        assert ticks.waits == [2.0, 2.0, 2.0]
        assert loop.num_published == 3

        await loop.stop()
        assert raw.exists(name) == 0
        assert await reader.read() == {}
        await client.aclose()

    try:
        asyncio.run(scenario())
    finally:
        raw.close()


def test_a_redis_outage_is_survived(
    tmp_path: Path, valkey_server: ValkeyServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, valkey_server.url)
    name = b"strata:registry:announce:127.0.0.1:7002"

    async def scenario() -> None:
        ticks = Ticks()
        loop = _loop(config, 7002, ticks, None)
        await loop.start()
        valkey_server.kill()
        await ticks.tick()
        await ticks.tick()  # still down: not logged again
        valkey_server.start()  # empty, as a Redis without persistence restarts
        await ticks.tick()
        raw = redis.Redis.from_url(valkey_server.url)
        assert open_announcement(RecordSeal(None), name, raw.get(name)).endpoint == (
            "127.0.0.1:7002"
        )
        raw.close()
        assert loop.num_published == 2
        await loop.stop()

    with caplog.at_level(logging.INFO, logger="strata.worker.announce"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("announcing failed, retrying every 2 s") for m in messages) == 1
    assert sum(m.startswith("announced 127.0.0.1:7002 as prefill") for m in messages) == 2
    assert messages[-1] == "announcement of 127.0.0.1:7002 withdrawn"


def test_stopping_never_deletes_a_successors_announcement(
    tmp_path: Path, valkey_server: ValkeyServer, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, valkey_server.url)
    name = b"strata:registry:announce:127.0.0.1:7003"

    async def scenario() -> bytes:
        ticks = Ticks()
        old = _loop(config, 7003, ticks, None)
        await old.start()
        # A new process at the same endpoint (a restart) announces itself: another boot id.
        successor = announcement_loop(config, 7003, None)
        assert successor is not None
        await successor.announcer.publish()
        await old.stop()
        raw = redis.Redis.from_url(valkey_server.url)
        kept = raw.get(name)
        raw.close()
        await successor.announcer.close()
        assert kept is not None
        assert successor.announcer.announcement.boot != old.announcer.announcement.boot
        return bytes(kept)

    with caplog.at_level(logging.INFO, logger="strata.worker.announce"):
        kept = asyncio.run(scenario())
    assert open_announcement(RecordSeal(None), name, kept).boot != ""
    assert caplog.records[-1].getMessage() == (
        "announcement of 127.0.0.1:7003 was gone already (expired, or replaced by a successor)"
    )


def test_the_announcer_refuses_a_ttl_below_a_second() -> None:
    announcement = Announcement("10.0.0.1:1", AnnouncedRole.BOTH, "m", "b")
    with pytest.raises(ValueError, match="at least 1 s"):
        Announcer("redis://127.0.0.1:1/0", announcement, cluster_key=None, ttl_s=0.5)


def _aio(url: str) -> redis.asyncio.Redis:
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url)


def test_a_worker_announces_once_serving_and_withdraws_first_on_sigterm(
    tmp_path: Path, valkey_server: ValkeyServer
) -> None:
    """The worker's own serve() (no engine: the HBM event hook is a no-op): the announcement is
    written once the gRPC server serves, names the advertised address, which is also the
    default instance id, and is gone before the gRPC server starts to stop on SIGTERM; then
    Health says draining (still ready), and the server stops only once the request in flight
    ended (the drain timeout is far away)."""
    import os
    import signal

    import grpc
    import redis.asyncio as aioredis

    from dataplane.worker import Worker
    from strata_proto import worker_pb2, worker_pb2_grpc

    config = _config(
        tmp_path,
        valkey_server.url,
        advertise_address="localhost",
        drain_notice_s=0.05,
        drain_timeout_s=600.0,
    )
    seen: dict[str, object] = {}

    class NoEngineWorker(Worker):
        def start_hbm_events(self) -> None:
            pass  # no engine, no events

        def create_service(self) -> grpc.aio.Server:
            server = super().create_service()
            stop = server.stop

            async def stop_recorded(grace: float | None) -> None:
                seen["in_flight_at_server_stop"] = self.num_in_flight()
                async with aioredis.Redis.from_url(valkey_server.url) as client:
                    seen["keys_at_server_stop"] = await client.keys("strata:registry:announce:*")
                await stop(grace)

            server.stop = stop_recorded  # type: ignore[method-assign]
            return server

    async def scenario() -> None:
        worker = NoEngineWorker(config)
        serving = asyncio.create_task(worker.serve())
        async with aioredis.Redis.from_url(valkey_server.url) as client:
            while not await client.keys("strata:registry:announce:*"):
                assert not serving.done(), serving
                await asyncio.sleep(0.02)
            (key,) = await client.keys("strata:registry:announce:*")
            seen["announcement"] = open_announcement(RecordSeal(None), key, await client.get(key))
            seen["ready"] = worker.ready
            seen["ids"] = (worker.endpoint, worker.instance_id)
            worker.counters.num_running += 1  # a request in flight
            os.kill(os.getpid(), signal.SIGTERM)  # the worker's handler stops it
            async with grpc.aio.insecure_channel(worker.endpoint) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                request = worker_pb2.HealthRequest()
                while not (health := await stub.Health(request, timeout=10)).draining:
                    await asyncio.sleep(0.02)
                seen["health_draining"] = (health.ready, health.draining)
            await asyncio.sleep(0.5)  # ten notices: a worker that did not wait would stop now
            seen["stopped_with_a_request"] = "keys_at_server_stop" in seen or serving.done()
            worker.counters.num_running -= 1  # it ends
            await asyncio.wait_for(serving, 60)
            seen["keys_after"] = await client.keys("strata:registry:announce:*")

    asyncio.run(scenario())
    announcement = seen["announcement"]
    assert isinstance(announcement, Announcement)
    assert announcement.endpoint.startswith("localhost:")
    assert announcement.role is AnnouncedRole.PREFILL
    assert seen["ready"] is True
    assert seen["ids"] == (announcement.endpoint, announcement.endpoint)
    assert seen["keys_at_server_stop"] == []  # withdrawn before the server stopped
    assert seen["health_draining"] == (True, True)
    assert seen["stopped_with_a_request"] is False
    assert seen["in_flight_at_server_stop"] == 0
    assert seen["keys_after"] == []


def test_a_redis_that_never_answers_does_not_hold_up_the_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # accepts, reads, never answers (a black-holed Redis)

        server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        announcement = Announcement("10.0.0.1:1", AnnouncedRole.DECODE, "m", "b")
        announcer = Announcer(
            f"redis://127.0.0.1:{port}/0", announcement, cluster_key=None, ttl_s=10.0
        )
        await AnnouncementLoop(announcer, interval_s=2.0).stop()
        server.close()

    with caplog.at_level(logging.WARNING, logger="strata.worker.announce"):
        asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records] == [
        "could not withdraw the announcement (it expires by itself): no answer within 2 s"
    ]
