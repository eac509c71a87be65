"""The store's data path and its clients load no gRPC: a KV client in an engine process or a
store node's connection handling pays for TLS (the ``ssl`` module), not for gRPC's runtime."""

from __future__ import annotations

import subprocess
import sys

DATA_PATH = [
    "kvstore.server.auth",
    "kvstore.client.sync",
    "kvstore.client.aio",
    "strata_common.tls",
]


def test_the_kv_data_path_imports_no_grpc() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {module}\n" for module in DATA_PATH)
        + "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "[]", done.stdout
