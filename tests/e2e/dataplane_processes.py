"""Real processes for the data-plane end-to-end tests: a store node (`python -m kvstore.server`), a
worker (`python -m dataplane.worker`, one vLLM engine) and gRPC calls to it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from strata_proto import worker_pb2, worker_pb2_grpc
from tests.conftest import REPO_ROOT

WORKER_READY_TIMEOUT_S = 600.0


@dataclass
class Process:
    """A running child process, its endpoint and what it printed."""

    proc: subprocess.Popen[str]
    endpoint: str = ""
    lines: list[str] = field(default_factory=list)

    def tail(self, n: int = 80) -> str:
        return "\n".join(self.lines[-n:])

    @property
    def metadata(self) -> str:
        """``strata://HOST:PORT`` of a store node's gRPC metadata service (``--metadata
        embedded``; printed before its ready line)."""
        prefix = "kvstore metadata on "
        for line in self.lines:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise RuntimeError(f"the store node serves no metadata:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def spawn(
    argv: list[str], ready: str, timeout_s: float, env: dict[str, str] | None = None
) -> Process:
    """Start ``argv``; ready when a line matches ``ready`` (its group 1: the endpoint)."""
    proc = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    process = Process(proc)
    found = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            process.lines.append(line.rstrip("\n"))
            m = re.search(ready, line)
            if m and not found.is_set():
                process.endpoint = m.group(1)
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not found.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            process.stop(signal.SIGKILL)
            raise RuntimeError(f"{argv[2]} did not become ready:\n{process.tail()}")
    return process


def start_store(*args: str) -> Process:
    argv = [sys.executable, "-m", "kvstore.server", "--host", "127.0.0.1", "--port", "0"]
    return spawn([*argv, "--arena-size", "64MiB", *args], r"kvstore node listening on (\S+)", 60)


def start_worker(model_dir: Path, role: str, store: str, *args: str) -> Process:
    argv = [sys.executable, "-m", "dataplane.worker", "--role", role, "--model", str(model_dir)]
    argv += ["--store", store, "--host", "127.0.0.1", "--port", "0", *args]
    return spawn(
        argv,
        r"strata worker ready .* listening on (\S+)",
        WORKER_READY_TIMEOUT_S,
        env={"VLLM_CPU_OMP_THREADS_BIND": "0"},
    )


def stub(endpoint: str) -> worker_pb2_grpc.WorkerStub:
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(endpoint))


def sampling(max_tokens: int) -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def decode(
    worker: worker_pb2_grpc.WorkerStub, prompt: list[int], max_tokens: int
) -> tuple[list[int], worker_pb2.DecodeChunk]:
    """Greedy tokens of one Decode call and its last chunk (cached/external token counts)."""
    request = worker_pb2.DecodeRequest(
        request_id=uuid.uuid4().hex, prompt_token_ids=prompt, sampling=sampling(max_tokens)
    )
    tokens: list[int] = []
    last = worker_pb2.DecodeChunk()
    for chunk in worker.Decode(request, timeout=300):
        tokens.extend(chunk.token_ids)
        last = chunk
    return tokens, last


def prefill(
    worker: worker_pb2_grpc.WorkerStub, prompt: list[int], cache_salt: str = ""
) -> worker_pb2.PrefillResponse:
    request = worker_pb2.PrefillRequest(
        request_id=uuid.uuid4().hex,
        prompt_token_ids=prompt,
        sampling=sampling(1),
        cache_salt=cache_salt,
    )
    response: worker_pb2.PrefillResponse = worker.Prefill(request, timeout=300)
    return response
