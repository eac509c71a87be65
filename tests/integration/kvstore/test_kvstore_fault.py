"""A store node killed (kill -9) in the middle of a large transfer: the caller gets a clean
KVStoreError subclass within its timeout -- never a hang, never a partial block reported as
data -- and a later call, once the node is back, succeeds.

A pass-through TCP proxy between the client and the node (``FrameProxy``, frame_proxy.py) makes
the moment of the kill exact: it forwards the node's responses until a few blocks have reached
the client, holds the rest while the test kills the node, then closes, as the node's socket
did. So the client has read part of the batch (several whole blocks and part of one) when
its connection dies.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvstore.client.sync import KVStoreClient
from kvstore.errors import KVStoreError, KVStoreUnavailable
from kvstore.wire.frame import FRAME_HEADER_BYTES, FrameHeader
from kvstore.wire.types import PutStatus
from tests.integration.kvstore.frame_proxy import FORWARD, FrameProxy, Hold, Verdict

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


class HoldingProxy(FrameProxy):
    """Forwards the first connection's replies until ``hold_after`` bytes of them reached the
    client, then holds the rest until :meth:`release` (:attr:`holding` is set meanwhile)."""

    def __init__(self, target: str, hold_after: int) -> None:
        self._forwarded = 0
        self._hold_after = hold_after
        super().__init__(target, on_reply=self._reply)

    def _reply(self, conn: int, header: FrameHeader, payload: bytearray) -> Verdict:
        size = FRAME_HEADER_BYTES + len(payload)
        if conn != 0 or self._forwarded > self._hold_after:
            return FORWARD
        self._forwarded += size
        if self._forwarded <= self._hold_after:
            return FORWARD
        return Hold(size - (self._forwarded - self._hold_after), then="forward")


@pytest.fixture
def proxy_factory() -> Iterator[Callable[[str], HoldingProxy]]:
    proxies: list[HoldingProxy] = []

    def factory(endpoint: str) -> HoldingProxy:
        proxy = HoldingProxy(endpoint, HOLD_AFTER_BYTES)
        proxies.append(proxy)
        return proxy

    yield factory
    for proxy in proxies:
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
        proxy.release()
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
