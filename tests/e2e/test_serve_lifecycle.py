"""Stopping `strata serve` (SIGTERM, or Ctrl-C's SIGINT) leaves no process behind: not the
gateway, the workers, the store, nor vLLM's engine-core processes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import start_server


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def descendants(pid: int) -> set[int]:
    tree = _children()
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


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
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = sorted(p for p in procs if _alive(p))
    assert not left, f"processes left behind: {left}"
