"""The worker's gRPC service in secret mode (docs/design/security.md §5.1), on its real server
construction path (``Worker.create_service``) without an engine: every Worker RPC without
credentials, with a wrong key, or by a role other than ``gateway`` is refused before its handler;
the gateway's own client (``WorkerClient`` with credentials) gets through."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

import dataplane.worker
from controlplane.api.sampling import SamplingOptions
from controlplane.workers.client import (
    FinishReason,
    WorkerClient,
    WorkerError,
    WorkerErrorKind,
    WorkerSampling,
)
from dataplane.config import WorkerConfig, WorkerRole
from dataplane.worker import Worker
from strata_common.credentials import Identity, load_or_create_cluster_key, rpc_authorization
from strata_common.grpc_auth import ClientAuth, add_port
from strata_proto import worker_pb2, worker_pb2_grpc
from tests.tls_certs import Cluster, outsiders

pytestmark = pytest.mark.timeout(120)

SERVICE = "/strata.v1.Worker/"
GATEWAY = Identity("gateway", "127.0.0.1:8000")
OPTIONS = SamplingOptions.greedy(1)
REQUESTS: dict[str, Any] = {
    "Health": worker_pb2.HealthRequest(),
    "Stats": worker_pb2.StatsRequest(),
    "Prefill": worker_pb2.PrefillRequest(request_id="r", prompt_token_ids=[1, 2, 3]),
    "Decode": worker_pb2.DecodeRequest(request_id="r", prompt_token_ids=[1, 2, 3]),
}


class RecordingService(worker_pb2_grpc.WorkerServicer):  # type: ignore[misc]
    """Stands in for the engine-backed WorkerService: records every handler run."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        RecordingService.runs = []

    runs: list[str] = []

    async def Health(self, request: Any, context: Any) -> worker_pb2.HealthResponse:
        self.runs.append("Health")
        return worker_pb2.HealthResponse(ready=True, role=worker_pb2.ROLE_BOTH, model="m")

    async def Stats(self, request: Any, context: Any) -> worker_pb2.StatsResponse:
        self.runs.append("Stats")
        return worker_pb2.StatsResponse(num_requests=7)

    async def Prefill(self, request: Any, context: Any) -> worker_pb2.PrefillResponse:
        self.runs.append("Prefill")
        return worker_pb2.PrefillResponse(first_token_id=5, num_prompt_tokens=3)

    async def Decode(self, request: Any, context: Any) -> AsyncIterator[worker_pb2.DecodeChunk]:
        self.runs.append("Decode")
        yield worker_pb2.DecodeChunk(
            token_ids=[6], text="x", finish_reason=worker_pb2.FINISH_REASON_STOP
        )


def _worker(model_dir: Path, key_file: Path | None) -> Worker:
    return Worker(
        WorkerConfig(
            role=WorkerRole.BOTH,
            model_dir=model_dir,
            store_endpoint="127.0.0.1:1",
            cluster_key_file=key_file,
        )
    )


async def _serving(worker: Worker, test: Callable[[str], Awaitable[None]]) -> None:
    server = worker.create_service()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await test(f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


async def _raw(address: str, rpc: str, metadata: Any) -> None:
    request = REQUESTS[rpc]
    async with grpc.aio.insecure_channel(address) as channel:
        if rpc == "Decode":
            call = channel.unary_stream(
                SERVICE + rpc, request_serializer=type(request).SerializeToString
            )(request, metadata=metadata, timeout=10)
            async for _ in call:
                pass
        else:
            await channel.unary_unary(
                SERVICE + rpc, request_serializer=type(request).SerializeToString
            )(request, metadata=metadata, timeout=10)


def _auth(key: bytes, identity: Identity, rpc: str) -> list[tuple[str, str]]:
    return [("authorization", rpc_authorization(key, identity, SERVICE + rpc, time.time()))]


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    load_or_create_cluster_key(path)
    return path


def test_every_worker_rpc_refuses_all_but_a_gateway_and_the_gateway_client_gets_through(
    tiny_model_dir: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataplane.worker, "WorkerService", RecordingService)
    key = bytes.fromhex(key_file.read_text())
    refusals: list[tuple[str, Any, str]] = []

    async def test(address: str) -> None:
        for rpc in REQUESTS:
            cases = [
                (None, "UNAUTHENTICATED", "needs cluster credentials: no credentials"),
                (_auth(os.urandom(32), GATEWAY, rpc), "UNAUTHENTICATED", "wrong credentials"),
                *[
                    (_auth(key, Identity(role, "x"), rpc), "PERMISSION_DENIED", "only role gateway")
                    for role in ("worker", "store", "admin")
                ],
            ]
            for metadata, code, reason in cases:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _raw(address, rpc, metadata)
                refusals.append((rpc, caught.value.code().name, caught.value.details()))
                assert caught.value.code().name == code and reason in (caught.value.details() or "")
        assert RecordingService.runs == []  # no handler ran
        # The gateway's client, with the gateway's credentials.
        client = WorkerClient(address, auth=ClientAuth(key, GATEWAY))
        sampling = WorkerSampling(max_tokens=1, options=OPTIONS)
        try:
            health = await client.health(timeout_s=10)
            assert (health.ready, health.model) == (True, "m")
            prefill = await client.prefill(
                request_id="r",
                prompt_token_ids=[1, 2, 3],
                sampling=sampling,
                cache_salt="",
                timeout_s=10,
            )
            assert prefill.first_token_id == 5
            chunks = [
                chunk
                async for chunk in client.decode(
                    request_id="r",
                    prompt_token_ids=[1, 2, 3],
                    sampling=sampling,
                    cache_salt="",
                    block_keys=[],
                    timeout_s=10,
                )
            ]
            assert [(c.token_ids, c.finish_reason) for c in chunks] == [((6,), FinishReason.STOP)]
        finally:
            await client.close()
        auth = ClientAuth(key, GATEWAY)
        async with grpc.aio.insecure_channel(
            address, interceptors=auth.aio_interceptors()
        ) as channel:
            stats = await worker_pb2_grpc.WorkerStub(channel).Stats(  # type: ignore[no-untyped-call]
                worker_pb2.StatsRequest(), timeout=10
            )
        assert stats.num_requests == 7
        assert RecordingService.runs == ["Health", "Prefill", "Decode", "Stats"]
        # A gateway without the key (e.g. misconfigured) is told why.
        stranger = WorkerClient(address)
        try:
            with pytest.raises(WorkerError) as failed:
                await stranger.health(timeout_s=10)
        finally:
            await stranger.close()
        assert failed.value.kind is WorkerErrorKind.FAILED
        assert "UNAUTHENTICATED" in failed.value.detail

    asyncio.run(_serving(_worker(tiny_model_dir, key_file), test))
    assert len(refusals) == 4 * 5


def test_the_real_service_answers_a_gateway_only_and_without_a_key_everyone(
    tiny_model_dir: Path, key_file: Path
) -> None:
    key = bytes.fromhex(key_file.read_text())

    async def with_key(address: str) -> None:
        client = WorkerClient(address, auth=ClientAuth(key, GATEWAY))
        try:
            health = await client.health(timeout_s=10)
        finally:
            await client.close()
        assert health.ready is False and health.capacity == 32  # no engine: not ready
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _raw(address, "Health", None)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED

    async def without_key(address: str) -> None:
        client = WorkerClient(address)
        try:
            assert (await client.health(timeout_s=10)).capacity == 32
        finally:
            await client.close()

    asyncio.run(_serving(_worker(tiny_model_dir, key_file), with_key))
    asyncio.run(_serving(_worker(tiny_model_dir, None), without_key))


def test_a_worker_config_refuses_an_unreadable_key_file_or_an_id_that_is_no_identity(
    tiny_model_dir: Path, key_file: Path
) -> None:
    base = {"role": WorkerRole.BOTH, "model_dir": tiny_model_dir, "store_endpoint": "h:1"}
    key_file.chmod(0o640)
    with pytest.raises(ValueError, match="chmod 600"):
        WorkerConfig(**base, cluster_key_file=key_file)
    key_file.chmod(0o600)
    with pytest.raises(ValueError, match="bad identity name"):
        WorkerConfig(**base, cluster_key_file=key_file, instance_id="has space")
    assert WorkerConfig(**base, cluster_key_file=key_file, instance_id="w-1").instance_id == "w-1"


# -- TLS mode (docs/design/security.md §3.1) ---------------------------------------------------


async def _raw_tls(address: str, rpc: str, credentials: grpc.ChannelCredentials) -> None:
    request = REQUESTS[rpc]
    async with grpc.aio.secure_channel(address, credentials) as channel:
        if rpc == "Decode":
            call = channel.unary_stream(
                SERVICE + rpc, request_serializer=type(request).SerializeToString
            )(request, timeout=10)
            async for _ in call:
                pass
        else:
            await channel.unary_unary(
                SERVICE + rpc, request_serializer=type(request).SerializeToString
            )(request, timeout=10)


def test_in_tls_mode_every_rpc_refuses_outsiders_and_other_roles_and_a_gateway_gets_through(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataplane.worker, "WorkerService", RecordingService)
    cluster = Cluster(tmp_path / "ca")
    worker = Worker(
        WorkerConfig(
            role=WorkerRole.BOTH,
            model_dir=tiny_model_dir,
            store_endpoint="127.0.0.1:1",
            tls=cluster.tls("worker/w1"),
        )
    )
    assert worker.config.instance_id == "w1"  # its certificate's name
    gateway = cluster.tls("gateway/g1")
    strangers = outsiders(cluster, tmp_path, "gateway/g1")

    async def test(address: str) -> None:
        for rpc in REQUESTS:
            for files in strangers.values():  # the handshake fails: no call is made
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _raw_tls(address, rpc, cluster.grpc_outsider(files))
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            for role in ("worker", "store", "admin"):
                files = cluster.files(f"{role}/x")
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _raw_tls(address, rpc, cluster.grpc_outsider(files))
                assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
                assert f"{role}/x may not call" in (caught.value.details() or "")
                assert "only role gateway" in (caught.value.details() or "")
        assert RecordingService.runs == []  # no handler ran
        client = WorkerClient(address, auth=ClientAuth.from_tls(gateway, "gateway"))
        try:
            assert (await client.health(timeout_s=10)).model == "m"
        finally:
            await client.close()
        assert RecordingService.runs == ["Health"]

    async def serving() -> None:
        server = worker.create_service()
        port = add_port(server, worker.tls())("127.0.0.1:0")
        await server.start()
        try:
            await test(f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    asyncio.run(serving())


def test_a_worker_refuses_a_certificate_of_another_role_or_name(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cluster = Cluster(tmp_path / "ca")
    base = {"role": WorkerRole.BOTH, "model_dir": tiny_model_dir, "store_endpoint": "h:1"}
    with pytest.raises(ValueError, match="needs a worker/\\* certificate"):
        WorkerConfig(**base, tls=cluster.tls("store/n1"))
    with pytest.raises(ValueError, match="differs from its certificate's worker/w1"):
        WorkerConfig(**base, tls=cluster.tls("worker/w1"), instance_id="w2")
