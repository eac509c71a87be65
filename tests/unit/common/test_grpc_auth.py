"""strata_common/grpc_auth.py over a real loopback grpc.aio server: every refusal happens before
the handler, with its exact code and message; the identity reaches the handler; health is exempt;
both client kinds (aio and blocking) add the credentials."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from strata_common.credentials import Identity, rpc_authorization
from strata_common.grpc_auth import (
    ClientAuth,
    ServerAuthInterceptor,
    _wrap,
    current_identity,
    roles_only,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_800_000_000.0
UNARY, STREAM, COLLECT = "/test.Echo/Unary", "/test.Echo/Stream", "/test.Echo/Collect"
GATEWAY = Identity("gateway", "g1")
WORKER = Identity("worker", "127.0.0.1:7001")


class Echo:
    """Records each handler run with the identity it saw."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, Identity | None]] = []

    async def unary(self, request: bytes, context: Any) -> bytes:
        self.runs.append(("unary", current_identity()))
        return b"echo:" + request

    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        self.runs.append(("stream", current_identity()))
        for part in (b"a", b"b"):
            yield part + request

    async def endless(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        self.runs.append(("endless", current_identity()))
        while True:
            yield request
            await asyncio.sleep(0.005)

    async def collect(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        self.runs.append(("collect", current_identity()))
        return b"+".join([r async for r in requests])


class Policy:
    """Gateways may call everything; a worker only Unary, and only with the request b"mine"."""

    def __init__(self) -> None:
        self.calls: list[tuple[Identity, str, Any]] = []

    def __call__(self, identity: Identity, method: str, request: Any) -> str | None:
        self.calls.append((identity, method, request))
        if identity.role == "gateway":
            return None
        if method == UNARY and request == b"mine":
            return None
        return "not yours"


class Served:
    def __init__(self, echo: Echo, policy: Policy, interceptor: ServerAuthInterceptor) -> None:
        self.echo, self.policy, self.interceptor = echo, policy, interceptor
        self.address = ""


async def _serve(test: Callable[[Served], Awaitable[None]]) -> Served:
    """Serve Echo behind the interceptor (server clock: NOW), run ``test`` against it, stop."""
    echo, policy = Echo(), Policy()
    interceptor = ServerAuthInterceptor(KEY, policy, clock=lambda: NOW)
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(echo.unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(echo.stream),
                    "Collect": grpc.stream_unary_rpc_method_handler(echo.collect),
                    "Endless": grpc.unary_stream_rpc_method_handler(echo.endless),
                },
            )
        ]
    )
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    served = Served(echo, policy, interceptor)
    served.address = f"127.0.0.1:{port}"
    try:
        await test(served)
    finally:
        await server.stop(None)
    return served


def serve(test: Callable[[Served], Awaitable[None]]) -> Served:
    return asyncio.run(_serve(test))


def _auth(identity: Identity, key: bytes = KEY, now: float = NOW) -> list[tuple[str, str]]:
    return [("authorization", rpc_authorization(key, identity, UNARY, now))]


async def _unary(address: str, metadata: Any = None, request: bytes = b"x") -> bytes:
    async with grpc.aio.insecure_channel(address) as channel:
        result: bytes = await channel.unary_unary(UNARY)(request, metadata=metadata, timeout=10)
        return result


async def _refusal(address: str, metadata: Any, request: bytes = b"x") -> tuple[Any, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _unary(address, metadata, request)
    return caught.value.code(), caught.value.details() or ""


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (None, "no credentials (metadata `authorization: Strata-HMAC ...`)"),
        ([("authorization", "Bearer abc")], "malformed credentials"),
        (_auth(GATEWAY) + _auth(GATEWAY), "malformed credentials"),
        (_auth(GATEWAY, key=OTHER_KEY), "wrong credentials"),
        (
            _auth(GATEWAY, now=NOW - 121),
            "credentials expired or from the future (check the clocks)",
        ),
        (
            _auth(GATEWAY, now=NOW + 121),
            "credentials expired or from the future (check the clocks)",
        ),
        (
            [("authorization", rpc_authorization(KEY, GATEWAY, STREAM, NOW))],
            "wrong credentials",
        ),  # made for another method
    ],
)
def test_bad_credentials_are_unauthenticated_before_the_handler(metadata: Any, reason: str) -> None:
    async def test(served: Served) -> None:
        code, details = await _refusal(served.address, metadata)
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert details == f"{UNARY} needs cluster credentials: {reason}"

    served = serve(test)
    assert served.echo.runs == [] and served.policy.calls == []
    assert served.interceptor.num_refused == 1


def test_credentials_within_the_window_pass_and_the_handler_sees_the_identity() -> None:
    async def test(served: Served) -> None:
        for now in (NOW - 120, NOW, NOW + 120):
            assert await _unary(served.address, _auth(GATEWAY, now=now)) == b"echo:x"

    served = serve(test)
    assert served.echo.runs == [("unary", GATEWAY)] * 3
    assert served.policy.calls == [(GATEWAY, UNARY, b"x")] * 3
    assert served.interceptor.num_refused == 0


def test_the_policy_sees_the_request_and_refuses_with_permission_denied() -> None:
    async def test(served: Served) -> None:
        assert await _unary(served.address, _auth(WORKER), b"mine") == b"echo:mine"
        code, details = await _refusal(served.address, _auth(WORKER), b"theirs")
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert details == f"worker/127.0.0.1:7001 may not call {UNARY}: not yours"

    served = serve(test)
    assert served.echo.runs == [("unary", WORKER)]
    assert served.policy.calls == [(WORKER, UNARY, b"mine"), (WORKER, UNARY, b"theirs")]


def test_streaming_methods_are_guarded_and_client_streams_are_authorised_without_request() -> None:
    gateway = ClientAuth(KEY, GATEWAY, clock=lambda: NOW)
    worker = ClientAuth(KEY, WORKER, clock=lambda: NOW)
    seen: list[Any] = []

    async def test(served: Served) -> None:
        async with grpc.aio.insecure_channel(served.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_stream(STREAM)(b"x", timeout=10).read()
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.stream_unary(COLLECT)(iter([b"1", b"2"]), timeout=10)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        seen.append(list(served.echo.runs))
        async with grpc.aio.insecure_channel(
            served.address, interceptors=gateway.aio_interceptors()
        ) as channel:
            parts = [p async for p in channel.unary_stream(STREAM)(b"x", timeout=10)]
            collected = await channel.stream_unary(COLLECT)(iter([b"1", b"2"]), timeout=10)
        assert (parts, collected) == ([b"ax", b"bx"], b"1+2")
        async with grpc.aio.insecure_channel(
            served.address, interceptors=worker.aio_interceptors()
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.stream_unary(COLLECT)(iter([b"1"]), timeout=10)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.details() == f"worker/127.0.0.1:7001 may not call {COLLECT}: not yours"

    served = serve(test)
    assert seen == [[]]
    assert served.echo.runs == [("stream", GATEWAY), ("collect", GATEWAY)]
    assert served.policy.calls == [
        (GATEWAY, STREAM, b"x"),
        (GATEWAY, COLLECT, None),
        (WORKER, COLLECT, None),
    ]


def test_a_guarded_stream_closed_from_another_context_closes_cleanly() -> None:
    """A server stream cut short (a Decode whose client went away) may be closed by the event
    loop's async-generator finalizer, in another context than the one that ran it. Nothing may
    fail there: resetting the identity variable there once raised ValueError ("created in a
    different Context"), which grpc logged for cancelled Decodes."""
    echo = Echo()
    handler = _wrap(
        grpc.unary_stream_rpc_method_handler(echo.endless), lambda request, context: GATEWAY
    )

    async def run() -> None:
        stream = handler.unary_stream(b"z", object())

        async def first() -> bytes:
            return cast(bytes, await stream.__anext__())

        assert await asyncio.create_task(first()) == b"z"  # runs in a copy of this context
        await asyncio.create_task(stream.aclose())  # closed from another copy
        assert current_identity() is None

    asyncio.run(run())
    assert echo.runs == [("endless", GATEWAY)]


def test_health_needs_no_credentials() -> None:
    async def test(served: Served) -> None:
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    served = serve(test)
    assert served.policy.calls == [] and served.interceptor.num_refused == 0


def test_the_identity_is_per_call_and_does_not_leak_out_of_the_handler() -> None:
    async def test(served: Served) -> None:
        await asyncio.gather(
            _unary(served.address, _auth(GATEWAY)),
            _unary(served.address, _auth(WORKER), b"mine"),
        )
        assert current_identity() is None

    served = serve(test)
    assert sorted(str(who) for _, who in served.echo.runs) == [str(GATEWAY), str(WORKER)]


def test_the_blocking_client_adds_credentials_and_replaces_a_callers_own() -> None:
    auth = ClientAuth(KEY, GATEWAY, clock=lambda: NOW)

    def calls(address: str) -> None:
        with grpc.insecure_channel(address) as plain:
            channel = auth.intercept(plain)
            stale = [("authorization", "Bearer stale"), ("x-other", "kept")]
            assert channel.unary_unary(UNARY)(b"y", metadata=stale, timeout=10) == b"echo:y"
            assert list(channel.unary_stream(STREAM)(b"y", timeout=10)) == [b"ay", b"by"]
            parts: Iterator[bytes] = iter([b"p", b"q"])
            assert channel.stream_unary(COLLECT)(parts, timeout=10) == b"p+q"

    async def test(served: Served) -> None:
        await asyncio.to_thread(calls, served.address)

    served = serve(test)
    assert served.echo.runs == [("unary", GATEWAY), ("stream", GATEWAY), ("collect", GATEWAY)]


def test_client_metadata_and_repr() -> None:
    auth = ClientAuth(KEY, GATEWAY, clock=lambda: NOW)
    expected = rpc_authorization(KEY, GATEWAY, UNARY, NOW)
    assert auth.authorization(UNARY) == auth.authorization(UNARY.encode()) == expected
    assert auth.metadata(UNARY, [("Authorization", "x"), ("a", "b")]) == [
        ("a", "b"),
        ("authorization", expected),
    ]
    assert repr(auth) == "ClientAuth(gateway/g1)" and KEY.hex() not in repr(auth)


def test_roles_only() -> None:
    policy = roles_only("gateway")
    assert policy(GATEWAY, UNARY, None) is None
    assert policy(WORKER, UNARY, None) == "only role gateway may call it"
    assert roles_only("store", "gateway")(WORKER, UNARY, None) == (
        "only role gateway, store may call it"
    )
