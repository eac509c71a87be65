"""Run inside a namespace host by the netns tests: ``serve ADDRESS PORT`` accepts connections
and answers each with the number of bytes it received (after the client shuts down its side);
``send ADDRESS PORT NBYTES`` sends that many bytes and prints ``BYTES SECONDS`` (the time from
the first byte to the server's answer)."""

from __future__ import annotations

import socket
import sys
import time

CHUNK = 1 << 20


def serve(address: str, port: int) -> None:
    with socket.create_server((address, port)) as server:
        print("listening", flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                total = 0
                while data := conn.recv(CHUNK):
                    total += len(data)
                conn.sendall(b"%d\n" % total)


def send(address: str, port: int, nbytes: int) -> None:
    payload = bytes(CHUNK)
    with socket.create_connection((address, port), timeout=5) as conn:
        conn.settimeout(120)
        start = time.monotonic()
        left = nbytes
        while left:
            conn.sendall(payload[: min(left, CHUNK)])
            left -= min(left, CHUNK)
        conn.shutdown(socket.SHUT_WR)
        answer = conn.makefile().readline()
        print(int(answer), time.monotonic() - start, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
