"""A store node killed (kill -9) in the middle of a large transfer: the caller gets a clean
KVStoreError subclass within its timeout -- never a hang, never a partial block reported as
data -- and a later call, once the node is back, succeeds.

A pass-through TCP proxy between the client and the node makes the moment of the kill exact: it
forwards the node's responses until a few blocks have reached the client, holds the rest while
the test kills the node, then forwards whatever the node had sent and closes, as the node's
socket did. So the client has read part of the batch (several whole blocks and part of one) when
its connection dies.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvstore.client.sync import KVStoreClient
from kvstore.errors import KVStoreError, KVStoreUnavailable
from kvstore.wire.types import PutStatus

pytestmark = pytest.mark.timeout(120)

NodeFactory = Callable[..., Any]
MIB = 1024 * 1024
NUM_BLOCKS = 24
PAYLOAD_BYTES = 2 * MIB - 64  # a 2 MiB block with its 64-byte header
HOLD_AFTER_BYTES = 5 * MIB  # two and a half blocks reach the client before the kill
CLIENT_TIMEOUT_S = 10.0


def key(n: int) -> bytes:
    return (0xFA17 << 112 | n).to_bytes(16, "big")


def payload(n: int) -> bytes:
    unit = bytes((i * 31 + n) % 256 for i in range(4099))
    return (unit * (PAYLOAD_BYTES // len(unit) + 1))[:PAYLOAD_BYTES]


class HoldingProxy:
    """Forwards loopback TCP to ``target``; on the first connection, holds the node's bytes after
    ``hold_after`` of them until :attr:`release` is set (:attr:`holding` is set meanwhile)."""

    def __init__(self, target: tuple[str, int], hold_after: int) -> None:
        self.target = target
        self.hold_after = hold_after
        self.holding = threading.Event()
        self.release = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._first = True
        self._spawn(self._accept)

    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=fn, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                node = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()  # the node is down: the client sees the connection fail
                continue
            self._sockets += [client, node]
            hold = self.hold_after if self._first else None
            self._first = False
            self._spawn(self._pump, client, node, None)
            self._spawn(self._pump, node, client, hold)

    def _pump(self, src: socket.socket, dst: socket.socket, hold_after: int | None) -> None:
        forwarded = 0
        try:
            while True:
                data = src.recv(256 * 1024)
                if not data:
                    break
                if hold_after is not None and forwarded + len(data) > hold_after:
                    dst.sendall(data[: hold_after - forwarded])
                    data = data[hold_after - forwarded :]
                    forwarded = hold_after
                    hold_after = None
                    self.holding.set()
                    self.release.wait(30)
                dst.sendall(data)
                forwarded += len(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture
def proxy_factory() -> Iterator[Callable[[str], HoldingProxy]]:
    proxies: list[HoldingProxy] = []

    def factory(endpoint: str) -> HoldingProxy:
        host, port = endpoint.rsplit(":", 1)
        proxy = HoldingProxy((host, int(port)), HOLD_AFTER_BYTES)
        proxies.append(proxy)
        return proxy

    yield factory
    for proxy in proxies:
        proxy.release.set()
        proxy.close()


def test_kill_during_a_large_get_is_a_clean_error_then_a_restart_serves(
    start_node: NodeFactory, proxy_factory: Callable[[str], HoldingProxy]
) -> None:
    node = start_node("--arena-size", "96MiB", "--prefault", "false")
    keys = [key(n) for n in range(NUM_BLOCKS)]
    with KVStoreClient(node.endpoint, use_shm=False) as loader:
        statuses = loader.put_many([(k, payload(n)) for n, k in enumerate(keys)])
        assert statuses == [PutStatus.OK] * NUM_BLOCKS
    proxy = proxy_factory(node.endpoint)
    client = KVStoreClient(proxy.endpoint, timeout_s=CLIENT_TIMEOUT_S, use_shm=False)
    outs = [bytearray(PAYLOAD_BYTES) for _ in keys]
    outcome: list[object] = []

    def transfer() -> None:
        try:
            outcome.append(client.get_many_into(keys, outs))
        except BaseException as exc:  # recorded for the assertions below
            outcome.append(exc)

    try:
        getter = threading.Thread(target=transfer)
        getter.start()
        assert proxy.holding.wait(30), "the transfer never started"
        node.stop(signal.SIGKILL)  # mid-transfer: 2.5 of 24 blocks delivered
        proxy.release.set()
        getter.join(CLIENT_TIMEOUT_S * 3)
        assert not getter.is_alive(), "the client hung"
        (result,) = outcome
        assert isinstance(result, KVStoreUnavailable), result
        assert isinstance(result, KVStoreError)
        assert bytes(outs[0]) == payload(0)  # what did arrive was whole before the kill ...
        assert bytes(outs[NUM_BLOCKS - 1]) == bytes(PAYLOAD_BYTES)  # ... the rest never did

        # While the node is down: a clean, immediate error too (connection refused).
        with pytest.raises(KVStoreUnavailable):
            client.get(keys[0])

        # The node comes back on the same port (empty: no SSD tier); the same client works.
        start_node("--arena-size", "96MiB", "--prefault", "false", port=node.port)
        assert client.get(keys[0]) is None  # a miss: the caller recomputes
        assert client.put(keys[0], payload(0)) is PutStatus.OK
        assert client.get_many_into(keys[:1], outs[:1]) == [PAYLOAD_BYTES]
        assert bytes(outs[0]) == payload(0)
    finally:
        client.close()
