"""`python -m controlplane.gateway` as a real process: start-up line, serving, SIGTERM -> exit 0."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from tokenizers import Tokenizer

from strata_proto import worker_pb2
from tests.integration.controlplane.conftest import DEFAULT_TEXT, LoopThread, default_script
from tests.integration.controlplane.scripted_worker import ScriptedWorker

REPO_ROOT = Path(__file__).resolve().parents[3]
LISTENING = "strata gateway listening on "


@pytest.fixture
def workers(
    loop_thread: LoopThread, tiny_model_dir: Path
) -> Iterator[tuple[ScriptedWorker, ScriptedWorker]]:
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    script = default_script(tokenizer)
    prefill = ScriptedWorker(worker_pb2.ROLE_PREFILL, script, tokenizer)
    decode = ScriptedWorker(worker_pb2.ROLE_DECODE, script, tokenizer)
    loop_thread.run(prefill.start())
    loop_thread.run(decode.start())
    yield prefill, decode
    loop_thread.run(prefill.stop())
    loop_thread.run(decode.stop())


def _spawn(model_dir: Path, prefill: str, decode: str, *extra: str) -> subprocess.Popen[str]:
    argv = [
        sys.executable, "-m", "controlplane.gateway",
        "--model-dir", str(model_dir), "--served-model-name", "tiny",
        "--prefill", prefill, "--decode", decode,
        "--host", "127.0.0.1", "--port", "0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        argv, cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    return proc.stdout.readline() if ready else ""


def test_gateway_process_serves_and_exits_cleanly_on_sigterm(
    workers: tuple[ScriptedWorker, ScriptedWorker], tiny_model_dir: Path
) -> None:
    prefill, decode = workers
    proc = _spawn(tiny_model_dir, prefill.endpoint, decode.endpoint)
    try:
        line = _read_line(proc, timeout_s=60)
        assert line.startswith(LISTENING), (line, proc.poll())
        url = line.removeprefix(LISTENING).strip()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hello world!"

        # SIGTERM while a request streams: it still finishes, then the process exits 0.
        prefill.script.decode_delay_s = 0.05
        stream = client.completions.create(model="tiny", prompt="Hi", max_tokens=50, stream=True)
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert "".join(c.choices[0].text for c in [first, *rest]) == DEFAULT_TEXT
        assert rest[-1].choices[0].finish_reason == "stop"
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def test_sigterm_during_start_up_exits_0(tiny_model_dir: Path) -> None:
    proc = _spawn(tiny_model_dir, "127.0.0.1:1", "127.0.0.1:1")
    try:
        # The "starting" log line comes once the signal handlers are installed.
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while "starting: model_dir=" not in proc.stderr.readline():
            assert time.monotonic() < deadline and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_gateway_process_fails_clearly_when_workers_never_come(tiny_model_dir: Path) -> None:
    # Nothing listens on these ports (port 1 needs root to bind, and nobody does).
    start = time.monotonic()
    proc = _spawn(tiny_model_dir, "127.0.0.1:1", "127.0.0.1:1", "--worker-startup-timeout", "500ms")
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert "cannot start: workers not ready" in stderr
    assert time.monotonic() - start < 60
