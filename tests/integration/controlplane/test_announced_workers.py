"""Workers that announce themselves (docs/design/multihost.md §3): two gateways sharing one
registry in a real Valkey, with the cluster key, and scripted workers (test doubles of the gRPC
worker) whose announcements are written with the worker's own code (strata_common.announce,
as dataplane/announcer.py does).

- Gateways configured with no worker at all start on announced workers alone, and both serve
  every announced worker, a late one included, under the same ids.
- A withdrawn announcement (a worker's SIGTERM) drains the instance on both gateways, then
  removes it once idle; one that expires in Redis removes it too.
- Forged announcements (no MAC, another cluster's key, a plain JSON value, a worker's sealed
  announcement copied under another endpoint) register nothing and are logged once each.

Gateways' health rounds are driven by the test (`sync_and_check`), so nothing depends on timing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis
from tokenizers import Tokenizer

from controlplane.config import (
    ClusterConfig,
    GatewayConfig,
    HttpConfig,
    RegistryConfig,
    RoutingConfig,
)
from controlplane.gateway import GatewayServer
from controlplane.instances.types import InstanceState
from controlplane.scheduling.policies import PolicyKind
from controlplane.text.tokenizer import ModelTokenizer
from controlplane.workers.roles import WorkerRole
from strata_common.announce import AnnouncedRole, Announcement, Announcer, new_boot_id
from strata_common.credentials import load_or_create_cluster_key
from strata_proto import worker_pb2
from tests.integration.controlplane.conftest import (
    SERVED_MODEL_NAME,
    LoopThread,
    default_script,
    start_workers,
)
from tests.integration.controlplane.scripted_worker import ScriptedWorker
from tests.integration.kvstore.valkey_fixture import valkey_url
from tests.waiting import wait_until

__all__ = ["valkey_url"]

OTHER_KEY = bytes(range(32))


def _complete(url: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    return client.completions.create(model=SERVED_MODEL_NAME, prompt="Hi").choices[0].text or ""


class Workers:
    """Scripted workers, each with the announcer a real worker would run."""

    def __init__(self, loop: LoopThread, model_dir: Path, url: str, key: bytes | None) -> None:
        self.loop = loop
        self.url = url
        self.key = key
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.script = default_script(self.tokenizer)
        self.workers: list[ScriptedWorker] = []
        self.announcers: list[Announcer] = []

    def start(self, role: int) -> ScriptedWorker:
        (worker,) = start_workers(self.loop, self.script, self.tokenizer, role, 1)
        self.workers.append(worker)
        return worker

    def announce(
        self, worker: ScriptedWorker, role: AnnouncedRole, *, key: bytes | str | None = "own"
    ) -> Announcer:
        seal_key = self.key if key == "own" else key
        assert not isinstance(seal_key, str)
        announcement = Announcement(worker.endpoint, role, "tiny", new_boot_id())
        announcer = Announcer(self.url, announcement, cluster_key=seal_key, ttl_s=600.0)
        self.loop.run(announcer.publish())
        self.announcers.append(announcer)
        return announcer

    def close(self) -> None:
        for announcer in self.announcers:
            self.loop.run(announcer.close())
        for worker in self.workers:
            self.loop.run(worker.stop())


@pytest.fixture
def cluster_key(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "cluster.key"
    key, _ = load_or_create_cluster_key(path)
    return path, key


@pytest.fixture
def workers(
    loop_thread: LoopThread, tiny_model_dir: Path, valkey_url: str, cluster_key: tuple[Path, bytes]
) -> Iterator[Workers]:
    made = Workers(loop_thread, tiny_model_dir, valkey_url, cluster_key[1])
    yield made
    made.close()


@pytest.fixture
def gateways(
    loop_thread: LoopThread,
    tiny_model_dir: Path,
    model_tokenizer: ModelTokenizer,
    valkey_url: str,
    cluster_key: tuple[Path, bytes],
    workers: Workers,
) -> Iterator[tuple[GatewayServer, GatewayServer]]:
    """Two gateways on one registry, configured with no worker: P and D are announced first."""
    workers.announce(workers.start(worker_pb2.ROLE_PREFILL), AnnouncedRole.PREFILL)
    workers.announce(workers.start(worker_pb2.ROLE_DECODE), AnnouncedRole.DECODE)
    config = GatewayConfig(
        model_dir=tiny_model_dir,
        served_model_name=SERVED_MODEL_NAME,
        http=HttpConfig(port=0, shutdown_grace_s=1.0),
        registry=RegistryConfig(
            worker_startup_timeout_s=20.0,
            health_check_interval_s=3600.0,
            url=valkey_url,
            announcement_grace_s=GRACE_S,
        ),
        routing=RoutingConfig(policy=PolicyKind.ROUND_ROBIN),
        cluster=ClusterConfig(key_file=cluster_key[0]),
    )
    a = GatewayServer(config, tokenizer=model_tokenizer)
    b = GatewayServer(config, tokenizer=model_tokenizer)
    loop_thread.run(a.start())
    try:
        loop_thread.run(b.start())
    except BaseException:
        loop_thread.run(a.stop())
        raise
    yield a, b
    loop_thread.run(a.stop())
    loop_thread.run(b.stop())


def sync_and_check(loop: LoopThread, *servers: GatewayServer) -> None:
    """One health round on each gateway."""

    async def round_(server: GatewayServer) -> None:
        await server.registry.sync()
        await server.registry.check_all()

    for server in servers:
        loop.run(round_(server))


GRACE_S = 0.2
"""The gateways' announcement grace: short, as the rounds here are the test's own."""


def missing_for_the_grace(loop: LoopThread, *servers: GatewayServer) -> None:
    """A round that finds an announcement missing, then one a grace later (withdrawn then)."""
    sync_and_check(loop, *servers)
    time.sleep(GRACE_S)
    sync_and_check(loop, *servers)


def listed(server: GatewayServer) -> dict[str, tuple[str, WorkerRole, InstanceState]]:
    """endpoint -> (id, role, state)."""
    return {i.endpoint: (i.id, i.role, i.state) for i in server.registry.list_instances()}


def test_gateways_without_workers_serve_every_announced_worker(
    loop_thread: LoopThread, workers: Workers, gateways: tuple[GatewayServer, GatewayServer]
) -> None:
    a, b = gateways
    prefill, decode = workers.workers
    ready = InstanceState.READY
    assert (
        listed(a)
        == listed(b)
        == {
            prefill.endpoint: ("w1", WorkerRole.PREFILL, ready),
            decode.endpoint: ("w2", WorkerRole.DECODE, ready),
        }
    )
    assert all(m.announced for m in a.registry._instances.values())
    for server in (a, b):
        assert _complete(server.url) == "Hello world!"
    assert (len(prefill.prefill_requests), len(decode.decode_requests)) == (2, 2)

    # A worker started later (a `both` one) is served by both after their next round.
    late = workers.start(worker_pb2.ROLE_BOTH)
    workers.announce(late, AnnouncedRole.BOTH)
    sync_and_check(loop_thread, a, b)
    assert listed(a)[late.endpoint] == listed(b)[late.endpoint] == ("w3", WorkerRole.DECODE, ready)
    for server in (a, b):
        for _ in range(2):  # round-robin over the two decode instances
            assert _complete(server.url) == "Hello world!"
    assert len(late.decode_requests) == 2  # one from each gateway


def test_a_withdrawn_or_expired_announcement_drains_then_removes_the_worker(
    loop_thread: LoopThread,
    workers: Workers,
    gateways: tuple[GatewayServer, GatewayServer],
    valkey_url: str,
) -> None:
    a, b = gateways
    d2 = workers.start(worker_pb2.ROLE_DECODE)
    d3 = workers.start(worker_pb2.ROLE_DECODE)
    announcer2 = workers.announce(d2, AnnouncedRole.DECODE)
    announcer3 = workers.announce(d3, AnnouncedRole.DECODE)
    sync_and_check(loop_thread, a, b)
    id2 = listed(a)[d2.endpoint][0]
    assert listed(b)[d2.endpoint] == (id2, WorkerRole.DECODE, InstanceState.READY)

    # D2 withdraws (its SIGTERM) while gateway A has a request on it: A drains it, and keeps
    # it (draining) until that request is done.
    on_a = a.registry.get(id2)
    a.registry._begin(on_a)
    assert loop_thread.run(announcer2.withdraw())
    missing_for_the_grace(loop_thread, a)
    assert listed(a)[d2.endpoint][2] is InstanceState.DRAINING
    # B has nothing on it: B drains it and deletes its record at once.
    missing_for_the_grace(loop_thread, b)
    wait_until(
        lambda: d2.endpoint not in listed(b),
        what="B did not remove the withdrawn worker",
        interval_s=0.02,
    )
    sync_and_check(loop_thread, a)  # the record is gone; A's request still runs
    assert not on_a.idle.is_set()
    d2.decode_requests.clear()
    for server in (a, b):
        for _ in range(3):
            assert _complete(server.url) == "Hello world!"
    assert d2.decode_requests == []  # nothing new goes to a withdrawn worker
    a.registry._end(on_a)  # A's request ends
    wait_until(
        lambda: d2.endpoint not in listed(a),
        what="A did not remove the withdrawn worker",
        interval_s=0.02,
    )

    # D3's announcement expires in Redis (the worker was killed, or lost Redis).
    raw = redis.Redis.from_url(valkey_url)
    raw.pexpire(announcer3.key, 1)
    wait_until(
        lambda: not raw.exists(announcer3.key), what="Redis did not expire it", interval_s=0.02
    )
    raw.close()
    missing_for_the_grace(loop_thread, a, b)  # idle on both: removed at once
    for server in (a, b):
        wait_until(
            lambda s=server: d3.endpoint not in listed(s),
            what="expired worker kept",
            interval_s=0.02,
        )
    assert set(listed(a)) == set(listed(b)) == {w.endpoint for w in workers.workers[:2]}
    for server in (a, b):
        assert _complete(server.url) == "Hello world!"

    # Announced again (the worker restarted): registered again, under a new id.
    workers.announce(d2, AnnouncedRole.DECODE)
    sync_and_check(loop_thread, a, b)
    assert listed(a)[d2.endpoint] == listed(b)[d2.endpoint]
    assert listed(a)[d2.endpoint][0] != id2


def test_forged_announcements_are_ignored(
    loop_thread: LoopThread,
    workers: Workers,
    gateways: tuple[GatewayServer, GatewayServer],
    valkey_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = gateways
    before = listed(a)
    # Real workers behind each: registering any of them would make it ready.
    unsealed, other, plain, moved = (workers.start(worker_pb2.ROLE_DECODE) for _ in range(4))
    workers.announce(unsealed, AnnouncedRole.DECODE, key=None)
    workers.announce(other, AnnouncedRole.DECODE, key=OTHER_KEY)
    raw = redis.Redis.from_url(valkey_url)
    body = Announcement(plain.endpoint, AnnouncedRole.DECODE, "tiny", "x").to_json()
    raw.set(f"strata:registry:announce:{plain.endpoint}", body)
    # A valid sealed announcement copied under another endpoint's key.
    genuine = workers.announce(workers.workers[1], AnnouncedRole.DECODE)
    raw.set(f"strata:registry:announce:{moved.endpoint}", raw.get(genuine.key))
    raw.close()
    with caplog.at_level(logging.WARNING, logger="strata_common.announce"):
        for _ in range(3):
            sync_and_check(loop_thread, a, b)
    assert listed(a) == listed(b) == before
    for worker in (unsealed, other, plain, moved):
        assert worker.decode_requests == []
    skipped = sorted(r.getMessage() for r in caplog.records if r.name == "strata_common.announce")
    key = "strata:registry:announce:"
    no_mac = "no MAC (written without the cluster key?)"
    bad_mac = "wrong MAC (another cluster key, altered, or moved from another key or id)"
    expected = [
        f"skipping the worker announcement under {(key + other.endpoint).encode()!r}: {bad_mac}",
        f"skipping the worker announcement under {(key + moved.endpoint).encode()!r}: {bad_mac}",
        f"skipping the worker announcement under {(key + plain.endpoint).encode()!r}: {no_mac}",
        f"skipping the worker announcement under {(key + unsealed.endpoint).encode()!r}: " + no_mac,
    ]
    # Once per gateway (each has its own reader), not once per round.
    assert skipped == sorted(expected * 2)
