"""The gateway with the Kubernetes launcher (``--k8s-namespace``), driven by `strata admin` (its
`main`, in this process, over real gRPC): what an operator sees — the dry run's planned
requests printed, a refusal by RBAC as a conflict with its reason, a start that fails on
unusable credentials. The API server is `KubeApiDouble` (a test double); the workers are
scripted workers on 127.0.0.x addresses standing for pod IPs
(test_kubernetes_launcher.py checks the launcher's requests in detail)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from controlplane.admin.config import AdminApiConfig
from controlplane.config import GatewayConfig, HttpConfig, RegistryConfig
from controlplane.gateway import GatewayServer
from controlplane.instances.instance import StartupError
from controlplane.launch.kubernetes_config import KubernetesConfig
from controlplane.text.tokenizer import ModelTokenizer
from strata.admin_cli import EXIT_CONFLICT, EXIT_OK
from strata.admin_cli import main as admin_main
from strata_proto import worker_pb2
from tests.integration.controlplane.conftest import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    SERVED_MODEL_NAME,
    LoopThread,
    default_script,
)
from tests.integration.controlplane.kube_api_double import SERVICE_ACCOUNT, KubeApiDouble
from tests.integration.controlplane.scripted_worker import ScriptedWorker
from tests.integration.controlplane.test_kubernetes_launcher import (
    patch_cost,
    planned_line,
    put_scale,
)

TOKEN = "gateway-admin-token-0123456789abcdef"
NS = "strata"


@dataclass
class K8sGateway:
    server: GatewayServer
    api: KubeApiDouble
    pods: dict[str, str]
    """Pod name by IP."""

    def admin(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        address = f"127.0.0.1:{self.server.admin_port}"
        code = admin_main(["--address", address, "--token", TOKEN, "--timeout", "10", *args])
        out, err = capsys.readouterr()
        return code, out, err


@contextlib.contextmanager
def k8s_gateway(
    loop: LoopThread,
    tmp_path: Path,
    model_dir: Path,
    model_tokenizer: ModelTokenizer,
    *,
    dry_run: bool,
) -> Iterator[K8sGateway]:
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    script = default_script(tokenizer)
    roles_ips = [
        (worker_pb2.ROLE_PREFILL, "127.0.0.2"),
        (worker_pb2.ROLE_DECODE, "127.0.0.3"),
        (worker_pb2.ROLE_DECODE, "127.0.0.4"),
    ]
    workers = [
        ScriptedWorker(role, script, tokenizer, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE)
        for role, _ in roles_ips
    ]
    for worker, (_, ip) in zip(workers, roles_ips, strict=True):
        loop.run(worker.start(host=ip))
    api = KubeApiDouble(NS)
    loop.run(api.start())
    names = api.add_deployment("strata-prefill", ["127.0.0.2"])
    names += api.add_deployment("strata-decode", ["127.0.0.3", "127.0.0.4"])
    config = GatewayConfig(
        model_dir=model_dir,
        served_model_name=SERVED_MODEL_NAME,
        prefill_endpoints=(workers[0].endpoint,),
        decode_endpoints=(workers[1].endpoint, workers[2].endpoint),
        http=HttpConfig(port=0, shutdown_grace_s=1.0),
        registry=RegistryConfig(
            worker_startup_timeout_s=10.0, health_check_interval_s=0.1, drain_timeout_s=5.0
        ),
        admin=AdminApiConfig(port=0, token=TOKEN),
        k8s=KubernetesConfig(
            namespace=NS, kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig"), dry_run=dry_run
        ),
    )
    server = GatewayServer(config, tokenizer=model_tokenizer)
    try:
        loop.run(server.start())
        api.requests.clear()
        ips = [ip for _, ip in roles_ips]
        yield K8sGateway(server, api, dict(zip(ips, names, strict=True)))
    finally:
        loop.run(server.stop())
        for worker in workers:
            loop.run(worker.stop())
        loop.run(api.stop())


def test_dry_run_prints_the_requests_and_changes_nothing(
    loop_thread: LoopThread,
    tmp_path: Path,
    tiny_model_dir: Path,
    model_tokenizer: ModelTokenizer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with k8s_gateway(
        loop_thread, tmp_path, tiny_model_dir, model_tokenizer, dry_run=True
    ) as gateway:
        rv = gateway.api.deployments["strata-decode"].resource_version
        code, out, err = gateway.admin(capsys, "scale", "--role", "decode", "--replicas", "1")
        assert code == EXIT_OK, err
        lines = out.splitlines()
        # Both decode workers are idle: the first by id (the 127.0.0.3 one) is chosen.
        assert lines[:4] == [
            "dry run: nothing changed; the gateway's launcher would send:",
            f"  {planned_line(patch_cost(gateway.pods['127.0.0.3']))}",
            f"  {planned_line(put_scale('strata-decode', rv, 1))}",
            "",
        ]
        assert lines[4].split() == ["ID", "ROLE", "STATE", "ENDPOINT", "LOAD"]
        assert [line.split()[2] for line in lines[5:]] == ["ready", "ready"]

        code, out, err = gateway.admin(
            capsys, "--json", "scale", "--role", "decode", "--replicas", "3"
        )
        assert code == EXIT_OK, err
        reply = json.loads(out)
        assert reply["planned"] == [planned_line(put_scale("strata-decode", rv, 3))]
        assert len(reply["instances"]) == 2
        assert not [r for r in gateway.api.requests if r.method != "GET"]

        code, out, err = gateway.admin(capsys, "list")
        decode_id = next(line.split()[0] for line in out.splitlines() if "127.0.0.4:" in line)
        code, out, err = gateway.admin(capsys, "set-role", decode_id, "--role", "prefill")
        assert code == EXIT_OK, err
        assert out.splitlines()[-1] == (
            "prefill: dry run: a new pod of Deployment strata/strata-prefill (one more "
            "replica): listed once it announces itself"
        )
        assert not [r for r in gateway.api.requests if r.method != "GET"]


def test_rbac_refusal_is_a_conflict_that_says_what_is_missing(
    loop_thread: LoopThread,
    tmp_path: Path,
    tiny_model_dir: Path,
    model_tokenizer: ModelTokenizer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with k8s_gateway(
        loop_thread, tmp_path, tiny_model_dir, model_tokenizer, dry_run=False
    ) as gateway:
        gateway.api.forbid.add(("update", "deployments/scale"))
        code, _, err = gateway.admin(capsys, "scale", "--role", "prefill", "--replicas", "2")
        assert code == EXIT_CONFLICT
        assert err.startswith(
            f"strata admin scale: FAILED_PRECONDITION: Kubernetes RBAC forbids {SERVICE_ACCOUNT} "
            "to update deployments/scale 'strata-prefill' in namespace strata"
        )
        gateway.api.forbid.clear()
        code, _, err = gateway.admin(capsys, "scale", "--role", "prefill", "--replicas", "2")
        assert code == EXIT_OK, err
        assert gateway.api.deployments["strata-prefill"].replicas == 2


def test_unusable_credentials_fail_the_start(
    tmp_path: Path, tiny_model_dir: Path, model_tokenizer: ModelTokenizer, loop_thread: LoopThread
) -> None:
    config = GatewayConfig(
        model_dir=tiny_model_dir,
        prefill_endpoints=("127.0.0.1:1",),
        decode_endpoints=("127.0.0.1:2",),
        http=HttpConfig(port=0),
        k8s=KubernetesConfig(namespace=NS, kubeconfig=tmp_path / "absent"),
    )
    server = GatewayServer(config, tokenizer=model_tokenizer)
    with pytest.raises(StartupError, match=r"Kubernetes credentials \(kubeconfig .*absent\)"):
        loop_thread.run(server.start())
