"""The launcher's port reservation (controlplane/launch/launcher.py `_reserve_port`): the worker it
starts (``--reuse-port true``: SO_REUSEPORT, same user) can bind and listen on the port, while
another user's process cannot, with either socket option, during the whole engine load."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from controlplane.launch.launcher import _reserve_port

_OTHER_USER = 65534  # nobody

_STRANGER = """
import socket, sys
port = int(sys.argv[1])
for option in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, option, 1)
    try:
        s.bind(("127.0.0.1", port))
        s.listen()
        print("bound", option)
    except OSError:
        print("refused", option)
    s.close()
"""


def test_the_worker_can_bind_the_reserved_port() -> None:
    reservation = _reserve_port("127.0.0.1")
    port = reservation.getsockname()[1]
    worker = socket.socket()
    worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # grpc.so_reuseport = 1
    worker.bind(("127.0.0.1", port))
    worker.listen()
    plain = socket.socket()
    with pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    for sock in (plain, worker, reservation):
        sock.close()


_SYSTEM_PYTHON = "/usr/bin/python3"  # another user cannot run the test's own (under /root)


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(_SYSTEM_PYTHON, os.X_OK),
    reason="needs root and a system python to run a process as another user",
)
def test_another_user_cannot_take_the_reserved_port() -> None:
    reservation = _reserve_port("127.0.0.1")
    port = reservation.getsockname()[1]
    try:
        result = subprocess.run(
            [_SYSTEM_PYTHON, "-c", _STRANGER, str(port)],
            user=_OTHER_USER,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            cwd="/",
            env={"PATH": os.environ.get("PATH", "")},
        )
    finally:
        reservation.close()
    assert result.stdout.split("\n")[:2] == [
        f"refused {int(socket.SO_REUSEADDR)}",
        f"refused {int(socket.SO_REUSEPORT)}",
    ], result.stdout + result.stderr
