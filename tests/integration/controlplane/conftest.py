"""Fixtures: a real gateway on a loopback port in front of two ScriptedWorker test doubles.

Gateway and workers share one uvloop event loop running in a background thread, so tests stay
plain synchronous functions that talk to the gateway over real sockets (the official `openai`
SDK, aiohttp, http.client) exactly as an external client would.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
import uvloop
from tokenizers import Tokenizer

from controlplane.config import GatewayConfig, HttpConfig, RegistryConfig
from controlplane.gateway import GatewayServer
from controlplane.text.tokenizer import ModelTokenizer
from strata_common.options import replace_nested
from strata_proto import worker_pb2
from tests.integration.controlplane.scripted_worker import (
    BLOCK_SIZE,
    DEFAULT_TEXT,
    MAX_MODEL_LEN,
    Script,
    ScriptedWorker,
    default_script,
)

T = TypeVar("T")

SERVED_MODEL_NAME = "tiny-scripted"
__all__ = ["BLOCK_SIZE", "DEFAULT_TEXT", "MAX_MODEL_LEN", "default_script"]  # re-exported


class LoopThread:
    """A uvloop event loop in a daemon thread; `run(coro)` blocks until the coroutine is done."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@dataclass
class Stack:
    """One gateway and its two scripted workers."""

    loop: LoopThread
    script: Script
    prefill: ScriptedWorker
    decode: ScriptedWorker
    server: GatewayServer
    url: str
    tokenizer: Tokenizer

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def set_script(self, script: Script) -> None:
        self.script = self.prefill.script = self.decode.script = script


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def model_tokenizer(tiny_model_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.from_model_dir(tiny_model_dir)


def start_stack(
    loop: LoopThread,
    model_dir: Path,
    tokenizer: ModelTokenizer,
    *,
    max_model_len: int = MAX_MODEL_LEN,
    **config_overrides: Any,
) -> Stack:
    worker_tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    script = default_script(worker_tokenizer)
    prefill, decode = (
        ScriptedWorker(
            role, script, worker_tokenizer, max_model_len=max_model_len, block_size=BLOCK_SIZE
        )
        for role in (worker_pb2.ROLE_PREFILL, worker_pb2.ROLE_DECODE)
    )
    loop.run(prefill.start())
    loop.run(decode.start())
    config = GatewayConfig(
        model_dir=model_dir,
        served_model_name=SERVED_MODEL_NAME,
        prefill_endpoints=(prefill.endpoint,),
        decode_endpoints=(decode.endpoint,),
        http=HttpConfig(port=0, shutdown_grace_s=1.0),
        registry=RegistryConfig(worker_startup_timeout_s=10.0),
    )
    server = GatewayServer(replace_nested(config, **config_overrides), tokenizer=tokenizer)
    url = loop.run(server.start())
    return Stack(loop, script, prefill, decode, server, url, worker_tokenizer)


def stop_stack(stack: Stack) -> None:
    stack.loop.run(stack.server.stop())
    stack.loop.run(stack.prefill.stop())
    stack.loop.run(stack.decode.stop())


@pytest.fixture(scope="module")
def module_stack(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer
) -> Iterator[Stack]:
    stack = start_stack(
        loop_thread, tiny_model_dir, model_tokenizer, http={"max_request_body_bytes": 64 * 1024}
    )
    yield stack
    stop_stack(stack)


@pytest.fixture
def stack(module_stack: Stack) -> Stack:
    """The module's stack with a fresh default script and cleared request records."""
    module_stack.set_script(default_script(module_stack.tokenizer))
    for worker in (module_stack.prefill, module_stack.decode):
        worker.prefill_requests.clear()
        worker.decode_requests.clear()
        worker.num_decodes_cancelled = 0
    return module_stack


@dataclass
class Cluster:
    """One gateway in front of several scripted prefill and decode workers sharing one script."""

    loop: LoopThread
    script: Script
    prefills: list[ScriptedWorker]
    decodes: list[ScriptedWorker]
    server: GatewayServer
    url: str
    tokenizer: Tokenizer

    @property
    def workers(self) -> list[ScriptedWorker]:
        return self.prefills + self.decodes

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)


def start_workers(
    loop: LoopThread, script: Script, tokenizer: Tokenizer, role: int, count: int
) -> list[ScriptedWorker]:
    workers = [
        ScriptedWorker(role, script, tokenizer, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE)
        for _ in range(count)
    ]
    for worker in workers:
        loop.run(worker.start())
    return workers


def start_cluster(
    loop: LoopThread,
    model_dir: Path,
    tokenizer: ModelTokenizer,
    *,
    num_prefill: int,
    num_decode: int,
    **config_overrides: Any,
) -> Cluster:
    worker_tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    script = default_script(worker_tokenizer)
    prefills = start_workers(loop, script, worker_tokenizer, worker_pb2.ROLE_PREFILL, num_prefill)
    decodes = start_workers(loop, script, worker_tokenizer, worker_pb2.ROLE_DECODE, num_decode)
    config = GatewayConfig(
        model_dir=model_dir,
        served_model_name=SERVED_MODEL_NAME,
        prefill_endpoints=tuple(w.endpoint for w in prefills),
        decode_endpoints=tuple(w.endpoint for w in decodes),
        http=HttpConfig(port=0, shutdown_grace_s=1.0),
        registry=RegistryConfig(worker_startup_timeout_s=10.0),
    )
    server = GatewayServer(replace_nested(config, **config_overrides), tokenizer=tokenizer)
    url = loop.run(server.start())
    return Cluster(loop, script, prefills, decodes, server, url, worker_tokenizer)


def stop_cluster(cluster: Cluster, *extra: ScriptedWorker) -> None:
    cluster.loop.run(cluster.server.stop())
    for worker in [*cluster.workers, *extra]:
        cluster.loop.run(worker.stop())
