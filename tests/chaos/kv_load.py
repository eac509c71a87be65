"""What the store's chaos tests (tests/chaos/test_kv_*.py) share: keys and payloads that name
their own content, and a client in a process of its own that a test can kill at a chosen point.

A payload is a function of its key, so a reader can tell whole, partial and foreign bytes apart
without remembering what it wrote: :func:`expected` recomputes it from the key alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from tests.conftest import REPO_ROOT

KIB = 1024
MIB = 1024 * KIB


def key(tag: int, n: int) -> bytes:
    """The n-th key of a test (``tag`` keeps tests' keys apart)."""
    return (tag << 96 | n).to_bytes(16, "big")


def payload(block_key: bytes, nbytes: int, salt: int = 0) -> bytes:
    """Bytes determined by the key (and ``salt``, to tell two writers of one key apart): a
    4093-byte period (prime, so no page aligns with it)."""
    seed = int.from_bytes(block_key[-4:], "big") + salt * 7919
    unit = bytes((i * 131 + seed * 17 + (seed >> 8)) % 256 for i in range(4093))
    return (unit * (nbytes // len(unit) + 1))[:nbytes]


def wait_for(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> float:
    """Poll until ``predicate()``; returns the seconds it took (AssertionError after timeout)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s:g}s")
        time.sleep(step_s)
    return time.monotonic() - start


_WRITER = """
import sys
from kvstore.client.sync import KVStoreClient
from tests.chaos.kv_load import payload
endpoint, transport, nbytes, salt, *keys = sys.argv[1:]
client = KVStoreClient(endpoint, timeout_s=600, use_shm=transport == "shm")
items = [(bytes.fromhex(k), payload(bytes.fromhex(k), int(nbytes), int(salt))) for k in keys]
print("statuses", [s.name for s in client.put_many(items)], flush=True)
"""


_READER = """
import sys, time
from kvstore.client.sync import KVStoreClient
endpoint, transport, k = sys.argv[1:]
client = KVStoreClient(endpoint, timeout_s=600, use_shm=transport == "shm")
print(len(client.get(bytes.fromhex(k)) or b""), flush=True)
time.sleep(600)  # keeps its connection until killed
"""


_STALLED_READER = """
import socket, sys, time
from kvstore.wire import requests
host, port, k = sys.argv[1:]
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
sock.connect((host, int(port)))
sock.sendall(requests.get(1, bytes.fromhex(k)))
got = 0
while got < 1024 * 1024:
    got += len(sock.recv(65536))
print(got, flush=True)
time.sleep(600)  # reads nothing more, keeps its connection until killed
"""


def start_client_process(script: str, *args: str) -> subprocess.Popen[str]:
    """``python -c script args...`` with this tree on its path, pipes for its output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_writer(
    endpoint: str, keys: list[bytes], nbytes: int, transport: str, salt: int = 0
) -> subprocess.Popen[str]:
    """A process that PUTs ``keys`` (``payload(key, nbytes, salt)`` each) with the real
    ``KVStoreClient`` over ``transport`` ("tcp" or "shm"), prints their statuses and exits."""
    keys_hex = (k.hex() for k in keys)
    return start_client_process(_WRITER, endpoint, transport, str(nbytes), str(salt), *keys_hex)


def start_reader(endpoint: str, block_key: bytes, transport: str) -> subprocess.Popen[str]:
    """A process that GETs ``block_key`` with the real ``KVStoreClient``, prints its length,
    then keeps its connection open until killed."""
    return start_client_process(_READER, endpoint, transport, block_key.hex())


def start_stalled_reader(endpoint: str, block_key: bytes) -> subprocess.Popen[str]:
    """A process that sends a TCP GET of ``block_key``, reads 1 MiB of the reply and stops
    reading (a small receive buffer: the node's reply backs up in its send buffer)."""
    host, port = endpoint.rsplit(":", 1)
    return start_client_process(_STALLED_READER, host, port, block_key.hex())
