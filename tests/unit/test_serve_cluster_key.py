"""`strata serve` creates CACHE_DIR/cluster.key (0600) on first start, keeps it afterwards, and
passes the file -- never the key -- to the store node and the gateway (docs/design/security.md
§3.2). The services are recorded, not started."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

import strata.cli
from strata.serve_config import ServeConfig
from strata.supervisor import Service, ServiceError
from strata_common.credentials import read_cluster_key


class RecordingSupervisor:
    """Records each service; "starting" the gateway ends the run (as a failed start would)."""

    started: list[Service] = []

    def __init__(self) -> None:
        RecordingSupervisor.started = []

    def start(self, service: Service, ready_timeout_s: float) -> Any:
        RecordingSupervisor.started.append(service)
        if service.name == "gateway":
            raise ServiceError("recorded, not started")
        return None

    def request_stop(self, *_: object) -> None:
        pass

    def stop_all(self, timeout_s: float = 20.0) -> None:
        pass


def _flag(service: Service, flag: str) -> str:
    argv = list(service.argv)
    return argv[argv.index(flag) + 1]


def test_serve_creates_the_cluster_key_once_and_passes_the_file(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(strata.cli, "Supervisor", RecordingSupervisor)
    monkeypatch.delenv("STRATA_ADMIN_TOKEN", raising=False)
    config = ServeConfig(model=tiny_model_dir, cache_dir=tmp_path / "cache")
    keys = []
    try:
        for _ in range(2):
            assert strata.cli.serve(config) == 1  # the recorded "failure" of the gateway
            key_file = tmp_path / "cache" / "cluster.key"
            assert os.stat(key_file).st_mode & 0o777 == 0o600
            keys.append(read_cluster_key(key_file))
            store, gateway = RecordingSupervisor.started
            assert _flag(store, "--cluster-key-file") == str(key_file)
            assert _flag(gateway, "--cluster-key-file") == str(key_file)
            for service in (store, gateway):
                assert keys[-1].hex() not in " ".join(service.argv)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert keys[0] == keys[1]  # kept, not replaced
