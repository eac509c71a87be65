"""The gateway's HTTP listener: aiohttp's server behind a guard on every connection.

aiohttp bounds neither the number of connections nor the time a response may wait for its client
to read, and its only read-side timer is the keep-alive one (which the gateway sets to
`read_timeout_s`: a connection's request head must arrive within it, counted from the connection
opening or its previous response; the body's own deadline is the handler's, api/app.py). So the
listener (`GuardedSite`, an aiohttp site) wraps each connection's aiohttp protocol in
`_GuardedProtocol`, which

* refuses a connection beyond `max_connections` with a 503 (OpenAI error JSON, `Retry-After: 1`,
  then close) instead of letting memory and file descriptors grow with whoever connects;
* bounds writes twice, both from `write_timeout_s`: the socket's `TCP_USER_TIMEOUT` (Linux) makes
  the kernel reset a connection whose data stays unacknowledged or unsent behind a zero window
  for that long, i.e. a client that stopped reading (its receive buffer fills within a few KiB);
  and a timer armed while the transport's buffer is over its high-water mark (the kernel's send
  buffer is full, a few MiB) aborts the connection when the buffer has not drained for that long
  (a client that reads too slowly to ever catch up, or a platform without TCP_USER_TIMEOUT).

Either way the connection is lost, aiohttp cancels its handler (`handler_cancellation=True`), and
the request's generation is closed: the decode call is cancelled and its load counters are
released (instances/load.py), within the write timeout of the client stopping.

`raise_file_limit` makes room for the cap: the soft open-file limit is raised (up to the hard
one) to `max_connections` plus a reserve at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
from collections.abc import Callable
from typing import Final, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from controlplane.api.openai_protocol import OpenAIError
from controlplane.metrics import GatewayMetrics

__all__ = ["ConnectionGuard", "GuardedSite", "raise_file_limit"]

logger = logging.getLogger("controlplane.gateway")

_TCP_USER_TIMEOUT: Final = getattr(socket, "TCP_USER_TIMEOUT", None)


def _too_many_connections(max_connections: int) -> bytes:
    error = OpenAIError(
        f"This server has {max_connections} open connections, its limit; retry shortly.",
        status=503,
        type="server_error",
        code="too_many_connections",
    )
    body = json.dumps(error.to_dict()).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


FD_RESERVE: Final = 256
"""File descriptors kept beside the HTTP connections: gRPC channels, the registry, logs."""


def raise_file_limit(
    max_connections: int,
    *,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> int:
    """Raise this process's soft RLIMIT_NOFILE (up to the hard one) so that `max_connections`
    connections and `FD_RESERVE` more fit: without it the cap is a fiction (a common soft limit
    is 1024), and running out of descriptors stalls the accept loop instead of answering 503.
    Returns the soft limit now in force; logs a warning when it is still short."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if target > soft:
            try:
                setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (OSError, ValueError) as exc:
                logger.warning("cannot raise the open-file limit to %d: %s", target, exc)
        if soft < wanted:
            logger.warning(
                "open-file limit %d is below --max-connections %d + %d: connections beyond "
                "about %d fail to be accepted instead of getting 503 (raise `ulimit -n`)",
                soft,
                max_connections,
                FD_RESERVE,
                max(0, soft - FD_RESERVE),
            )
    return int(soft)


class ConnectionGuard:
    """What every connection of one listener shares: the limits and the open count."""

    __slots__ = ("_refusal", "max_connections", "metrics", "open_connections", "write_timeout_s")

    def __init__(
        self, *, max_connections: int, write_timeout_s: float, metrics: GatewayMetrics
    ) -> None:
        if max_connections < 1 or not write_timeout_s > 0:
            raise ValueError("max_connections must be >= 1 and write_timeout_s > 0")
        self.max_connections = max_connections
        self.write_timeout_s = write_timeout_s
        self.metrics = metrics
        self.open_connections = 0
        self._refusal = _too_many_connections(max_connections)

    def admit(self, transport: asyncio.Transport) -> bool:
        """Count a new connection in, or answer it 503 and close it (False)."""
        if self.open_connections >= self.max_connections:
            self.metrics.http_connections_refused.inc()
            transport.write(self._refusal)
            transport.close()
            return False
        self.open_connections += 1
        self.metrics.http_connections.inc()
        sock = transport.get_extra_info("socket")
        if _TCP_USER_TIMEOUT is not None and sock is not None:
            with contextlib.suppress(OSError):  # not TCP (a Unix socket)
                sock.setsockopt(
                    socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, int(self.write_timeout_s * 1000)
                )
        return True

    def release(self) -> None:
        self.open_connections -= 1
        self.metrics.http_connections.dec()


class _GuardedProtocol(asyncio.Protocol):
    """One connection: aiohttp's protocol, admitted by the guard, with a write-stall timer."""

    __slots__ = ("_guard", "_handler", "_server", "_transport", "_write_timer")

    def __init__(self, server: web.Server, guard: ConnectionGuard) -> None:
        self._server = server
        self._guard = guard
        self._handler: RequestHandler | None = None
        self._transport: asyncio.Transport | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's TCPTransport is not an asyncio.Transport subclass).
        transport = cast(asyncio.Transport, transport)
        if not self._guard.admit(transport):
            return
        self._transport = transport
        self._handler = self._server()
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)

    def eof_received(self) -> None:
        if self._handler is not None:
            self._handler.eof_received()  # aiohttp's: None, the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        handler, self._handler = self._handler, None
        if handler is None:
            return
        self._cancel_write_timer()
        self._guard.release()
        handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._handler is None:
            return
        if self._write_timer is None:
            loop = asyncio.get_running_loop()
            self._write_timer = loop.call_later(self._guard.write_timeout_s, self._write_stalled)
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is None:
            return
        self._cancel_write_timer()
        self._handler.resume_writing()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_stalled(self) -> None:
        self._write_timer = None
        if self._transport is None or self._handler is None:
            return
        peer = self._transport.get_extra_info("peername")
        logger.warning(
            "HTTP client %s has not read its response for %g s: connection aborted",
            peer,
            self._guard.write_timeout_s,
        )
        self._guard.metrics.http_write_timeouts.inc()
        self._transport.abort()  # connection_lost follows: aiohttp cancels the handler


class GuardedSite(web.BaseSite):
    """A TCP listener whose connections go through a `ConnectionGuard` (module docstring)."""

    __slots__ = ("_bound_port", "_guard", "_host", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        *,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard
        self._bound_port: int | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._bound_port if self._bound_port is not None else self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        if server is None:
            raise RuntimeError("GuardedSite started before its runner's setup()")
        guard = self._guard
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _GuardedProtocol(server, guard),
            self._host,
            self._port,
            backlog=self._backlog,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]
