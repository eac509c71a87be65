"""Starting and stopping Strata's processes on one host, leaving nothing behind.

Each service is a child process in its own process group (so a terminal's Ctrl-C reaches only the
supervisor, which then stops the children in order) but in the supervisor's session (so the
kernel shares cores between Strata's tasks fairly; controlplane/launch/processes.py) with
PR_SET_PDEATHSIG set, so that even a
`kill -9` of the supervisor takes its children down. A service counts as started when it prints its
ready line; its output is echoed with a `[name]` prefix. Stopping sends SIGTERM to the child's whole
process group (vLLM's engine-core processes included), waits, then SIGKILLs what is left.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from controlplane.launch.processes import killpg_quietly, start_child
from strata_common.secrets import scrubbed_environment


class ServiceError(RuntimeError):
    pass


@dataclass
class Service:
    name: str
    argv: Sequence[str]
    ready_pattern: str
    env: dict[str, str] = field(default_factory=dict)
    """Set in its environment, beyond what it inherits."""
    env_prefixes: tuple[str, ...] = ()
    """Variables of this process's environment it inherits beyond the runtime ones (its own
    configuration, e.g. ``STRATA_KVSTORE_``); nothing else (strata_common/secrets.py)."""
    keep_env: tuple[str, ...] = ()
    """Variables it inherits by name, secrets included (the gateway's admin token)."""
    proc: subprocess.Popen[bytes] | None = None
    ready_match: re.Match[str] | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _tail: list[str] = field(default_factory=list)

    def start(self) -> None:
        env = scrubbed_environment(
            os.environ,
            prefixes=self.env_prefixes,
            keep=self.keep_env,
            extra={**self.env, "PYTHONUNBUFFERED": "1"},
        )
        self.proc = start_child(self.argv, env)
        threading.Thread(target=self._pump, name=f"pump-{self.name}", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        pattern = re.compile(self.ready_pattern)
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._tail = [*self._tail[-40:], line]
            try:
                sys.stdout.write(f"[{self.name}] {line}\n")
                sys.stdout.flush()
            except (BrokenPipeError, ValueError):
                pass
            if not self._ready.is_set():
                m = pattern.search(line)
                if m:
                    self.ready_match = m
                    self._ready.set()

    def wait_ready(self, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._ready.wait(0.2):
                assert self.ready_match is not None
                return self.ready_match
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with code {self.proc.returncode} before it was ready:\n"
                    + "\n".join(self._tail[-20:])
                )
        raise ServiceError(f"{self.name} was not ready within {timeout_s:.0f} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float) -> None:
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid  # the child leads its own process group (start_child)
        if proc.poll() is None:
            killpg_quietly(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout_s)
        # Whatever is left in the group (the child or its own children) is killed outright.
        killpg_quietly(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


class Supervisor:
    """Owns the services of one `strata serve`: starts them in order, stops them in reverse."""

    def __init__(self) -> None:
        self.services: list[Service] = []
        self._stopping = threading.Event()

    def start(self, service: Service, ready_timeout_s: float) -> re.Match[str]:
        self.services.append(service)
        service.start()
        return service.wait_ready(ready_timeout_s)

    def request_stop(self, *_: object) -> None:
        self._stopping.set()

    def wait(self) -> int:
        """Block until a stop is requested (0) or a service dies on its own (1)."""
        while not self._stopping.wait(0.5):
            for service in self.services:
                if not service.alive():
                    code = service.proc.returncode if service.proc else None
                    print(f"strata: {service.name} exited unexpectedly (code {code})", flush=True)
                    return 1
        return 0

    def stop_all(self, timeout_s: float = 20.0) -> None:
        for service in reversed(self.services):
            service.stop(timeout_s)
