"""Stopping `strata serve` (SIGTERM, or Ctrl-C's SIGINT) leaves no process behind: not the
gateway, the workers, the store, nor vLLM's engine-core processes."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import start_server
from tests.proc_tree import descendants, wait_gone


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_serve_leaves_no_process(tiny_model_dir: Path, sig: int) -> None:
    server = start_server(tiny_model_dir)
    try:
        procs = descendants(server.proc.pid)
        # gateway, 2 workers (+ their engine cores), store: well over four processes.
        assert len(procs) >= 4, procs
        r = httpx.get(server.base_url + "/health", timeout=10)
        assert r.status_code == 200
    finally:
        code = server.stop(sig, timeout_s=90)
    assert code == 0, "\n".join(server.lines[-40:])
    left = wait_gone(procs)
    assert not left, f"processes left behind: {left}"
