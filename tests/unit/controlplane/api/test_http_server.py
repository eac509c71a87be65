"""The connection guard: the cap's 503, the count, and the write-stall timer (a fake transport and
a fake aiohttp protocol; the real ones: tests/integration/controlplane/test_gateway_limits.py)."""

from __future__ import annotations

import asyncio
import json
import resource
from typing import Any

import pytest

from controlplane.api.http_server import (
    FD_RESERVE,
    ConnectionGuard,
    _GuardedProtocol,
    raise_file_limit,
)
from controlplane.metrics import GatewayMetrics


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class FakeHandler:
    """Records what the guard forwards to aiohttp's protocol."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append(name)


def _guard(max_connections: int = 2) -> ConnectionGuard:
    return ConnectionGuard(
        max_connections=max_connections, write_timeout_s=30.0, metrics=GatewayMetrics()
    )


def _connect(guard: ConnectionGuard) -> tuple[_GuardedProtocol, FakeTransport, FakeHandler]:
    handler = FakeHandler()
    protocol = _GuardedProtocol(lambda: handler, guard)  # type: ignore[arg-type, return-value]
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport, handler


def _sample(guard: ConnectionGuard, name: str) -> float | None:
    return guard.metrics.registry.get_sample_value(f"strata_gateway_{name}")


def test_cap_refuses_with_503_and_counts() -> None:
    guard = _guard(max_connections=2)
    first, _, first_handler = _connect(guard)
    _connect(guard)
    assert guard.open_connections == 2 and _sample(guard, "http_connections") == 2
    assert first_handler.calls == ["connection_made"]
    refused, transport, handler = _connect(guard)
    assert transport.closed and handler.calls == []  # aiohttp never saw it
    head, _, body = transport.written.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 503 Service Unavailable"
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body)["error"]["code"] == "too_many_connections"
    assert _sample(guard, "http_connections_refused_total") == 1
    refused.connection_lost(None)  # a refused connection was never counted in
    assert guard.open_connections == 2
    first.connection_lost(None)
    assert guard.open_connections == 1 and first_handler.calls[-1] == "connection_lost"
    first.connection_lost(None)  # idempotent
    assert guard.open_connections == 1
    _, transport, _ = _connect(guard)
    assert not transport.closed


def test_write_stall_timer_aborts_only_a_buffer_that_does_not_drain() -> None:
    asyncio.run(_write_stall_timer())


async def _write_stall_timer() -> None:
    loop = asyncio.get_running_loop()
    guard = _guard()
    protocol, transport, handler = _connect(guard)
    protocol.pause_writing()  # the transport's buffer went over its high-water mark
    timer = protocol._write_timer
    assert timer is not None and timer.when() == pytest.approx(loop.time() + 30.0, abs=1.0)
    protocol.resume_writing()  # it drained: no stall
    assert timer.cancelled() and protocol._write_timer is None
    assert handler.calls == ["connection_made", "pause_writing", "resume_writing"]
    protocol.pause_writing()
    protocol._write_stalled()  # the timer firing: 30 s without draining
    assert transport.aborted
    assert _sample(guard, "http_write_timeouts_total") == 1
    protocol.connection_lost(ConnectionAbortedError())  # what the abort leads to
    assert handler.calls[-1] == "connection_lost" and guard.open_connections == 0


def test_guard_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        ConnectionGuard(max_connections=0, write_timeout_s=1.0, metrics=GatewayMetrics())


@pytest.mark.parametrize(
    ("soft", "hard", "expected", "set_to"),
    [
        (1024, 65536, 2048 + FD_RESERVE, (2048 + FD_RESERVE, 65536)),  # raised to fit
        (1024, 1500, 1500, (1500, 1500)),  # raised as far as the hard limit allows
        (100_000, 100_000, 100_000, None),  # already enough: untouched
        (
            1024,
            resource.RLIM_INFINITY,
            2048 + FD_RESERVE,
            (2048 + FD_RESERVE, resource.RLIM_INFINITY),
        ),
    ],
)
def test_file_limit_is_raised_for_the_cap(
    soft: int, hard: int, expected: int, set_to: tuple[int, int] | None
) -> None:
    calls: list[tuple[int, int]] = []
    got = raise_file_limit(
        2048,
        getrlimit=lambda _: (soft, hard),
        setrlimit=lambda _, limits: calls.append(limits),
    )
    assert got == expected
    assert calls == ([] if set_to is None else [set_to])


def test_file_limit_that_cannot_be_raised_is_reported() -> None:
    def refuse(_: int, limits: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    assert raise_file_limit(2048, getrlimit=lambda _: (1024, 65536), setrlimit=refuse) == 1024
