"""A gateway in secret mode (``--cluster-key-file``; docs/design/security.md §5.1): it calls
workers that answer only role ``gateway`` and follows a store node's metadata service that
requires credentials, and serves requests as without a key; a gateway without the key is refused
by its workers and fails to start, saying why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from tokenizers import Tokenizer

from controlplane.config import (
    ClusterConfig,
    GatewayConfig,
    HttpConfig,
    RegistryConfig,
    RoutingConfig,
)
from controlplane.gateway import GatewayServer, StartupError
from controlplane.text.tokenizer import ModelTokenizer
from strata_common.credentials import load_or_create_cluster_key
from strata_common.grpc_auth import ServerAuthInterceptor, roles_only
from strata_proto import worker_pb2
from tests.integration.controlplane.conftest import LoopThread
from tests.integration.controlplane.scripted_worker import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    ScriptedWorker,
    default_script,
)
from tests.integration.kvstore.node_process import NodeFactory, start_node

pytestmark = pytest.mark.timeout(120)
__all__ = ["start_node"]  # the fixture


def _workers(loop: LoopThread, model_dir: Path, key: bytes) -> list[ScriptedWorker]:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    script = default_script(tokenizer)
    workers = [
        ScriptedWorker(role, script, tokenizer, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE)
        for role in (worker_pb2.ROLE_PREFILL, worker_pb2.ROLE_DECODE)
    ]
    guard = ServerAuthInterceptor(key, roles_only("gateway"))
    for worker in workers:
        loop.run(worker.start(interceptors=[guard]))
    return workers


def _config(model_dir: Path, workers: list[ScriptedWorker], **kwargs: Any) -> GatewayConfig:
    prefill, decode = workers
    return GatewayConfig(
        model_dir=model_dir,
        served_model_name="tiny-scripted",
        prefill_endpoints=(prefill.endpoint,),
        decode_endpoints=(decode.endpoint,),
        http=HttpConfig(port=0, shutdown_grace_s=1.0),
        **kwargs,
    )


def test_a_gateway_with_the_key_serves_and_follows_the_metadata(
    loop_thread: LoopThread,
    tiny_model_dir: Path,
    model_tokenizer: ModelTokenizer,
    start_node: NodeFactory,
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "cluster.key"
    key, _ = load_or_create_cluster_key(key_file)
    node = start_node(
        "--metadata", "embedded", "--node-id", "N", "--prefault", "false",
        "--cluster-key-file", str(key_file),
    )  # fmt: skip
    workers = _workers(loop_thread, tiny_model_dir, key)
    config = _config(
        tiny_model_dir,
        workers,
        registry=RegistryConfig(worker_startup_timeout_s=10.0),
        routing=RoutingConfig(kv_metadata=node.metadata),
        cluster=ClusterConfig(key_file=key_file),
    )
    server = GatewayServer(config, tokenizer=model_tokenizer)
    try:
        url = loop_thread.run(server.start())
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="tiny-scripted", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content
        assert len(workers[0].prefill_requests) == 1 and len(workers[1].decode_requests) == 1
        view = server.cluster_view
        assert view is not None
        assert view.wait_for(lambda v: v.live_nodes() == {"N": node.endpoint}, 10.0)
    finally:
        loop_thread.run(server.stop())
        for worker in workers:
            loop_thread.run(worker.stop())
    assert "refused a call" not in node.log()


def test_a_gateway_without_the_key_is_refused_by_its_workers(
    loop_thread: LoopThread, tiny_model_dir: Path, model_tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    key, _ = load_or_create_cluster_key(tmp_path / "cluster.key")
    workers = _workers(loop_thread, tiny_model_dir, key)
    config = _config(tiny_model_dir, workers, registry=RegistryConfig(worker_startup_timeout_s=2.0))
    server = GatewayServer(config, tokenizer=model_tokenizer)
    try:
        with pytest.raises(StartupError, match="UNAUTHENTICATED"):
            loop_thread.run(server.start())
    finally:
        loop_thread.run(server.stop())
        for worker in workers:
            loop_thread.run(worker.stop())
    assert workers[0].prefill_requests == [] and workers[1].decode_requests == []
