"""A store client run inside a namespace host by test_tls_hosts.py: ``python -m
tests.integration.multihost.tls_client ENDPOINT [CERT KEY CA]`` puts and reads back one block
(as ``worker/*`` with the certificate, without credentials otherwise) and prints ``ok``, or the
error's class and message."""

from __future__ import annotations

import sys

from kvstore.client.sync import KVStoreClient
from kvstore.errors import KVStoreError
from strata_common.tls import TlsConfig

BLOCK = bytes(range(256)) * 15


def main(argv: list[str]) -> int:
    endpoint, files = argv[0], argv[1:]
    credentials = TlsConfig(*files).credentials("worker") if files else None
    key = (0xC0FFEE << 100).to_bytes(16, "big")
    try:
        with KVStoreClient(endpoint, use_shm=False, credentials=credentials) as client:
            client.put(key, BLOCK)
            assert client.get(key) == BLOCK
    except KVStoreError as exc:
        print(f"{type(exc).__name__}: {exc}")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
