"""deploy/ as the tests read it: the Kustomize overlays rendered with the real ``kubectl
kustomize`` (offline), the compose file, and what a container of either runs.

Each render works on a copy of deploy/k8s, where the files the operator creates for the Secrets
(deploy/k8s/secrets/files/, git-ignored) are stand-ins, and where an extra overlay adds the
optional KEDA component to the gpu overlay, so that it is rendered and checked too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"

#: The overlays an operator applies, and ``gpu-keda``: gpu plus the optional KEDA component.
OVERLAYS = ("cpu-demo", "gpu", "gpu-keda")
WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet")
POOLS = ("strata-prefill", "strata-decode")

#: What the downward API would give a pod, for expanding ``$(VAR)`` in a test.
FIELD_VALUES = {
    "metadata.name": "strata-prefill-5d8f9c7b6-x2x4q",
    "metadata.namespace": "strata",
    "status.podIP": "10.244.1.7",
    "status.hostIP": "192.0.2.10",
    "spec.nodeName": "gpu-node-a",
}
SECRET_VALUE = "s3cret-for-tests"

_SECRET_FILES = (
    "cluster.key",
    "ca/ca.pem",
    "ca/ca-key.pem",
    "api-keys",
    "admin-token",
    "redis-password",
)


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed: the Kustomize overlays cannot be rendered")
    return path


def copy_tree(work: Path) -> Path:
    """deploy/k8s copied under ``work``, with stand-in secret files and the gpu-keda overlay."""
    root = work / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("files"))
    files = root / "secrets" / "files"
    for name in _SECRET_FILES:
        (files / name).parent.mkdir(parents=True, exist_ok=True)
        (files / name).write_text(f"stand-in for {name}\n")
    # gpu-keda: the gpu overlay with its optional KEDA line switched on, as an operator would.
    gpu = root / "overlays" / "gpu"
    extra = root / "overlays" / "gpu-keda"
    shutil.copytree(gpu, extra)
    text = (gpu / "kustomization.yaml").read_text()
    line = "  # - ../../components/keda"
    assert line in text, "the gpu overlay no longer offers the KEDA component"
    (extra / "kustomization.yaml").write_text(text.replace(line, "  - ../../components/keda"))
    return root


def render(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIRECTORY``: the objects, in order."""
    done = subprocess.run(
        ["nice", "-n", "19", kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} in the render"
    return found[0]


@dataclass(frozen=True)
class Container:
    """One container of a rendered workload (or a compose service)."""

    workload: str  # KIND/NAME
    name: str
    spec: dict[str, Any]
    pod: dict[str, Any]  # the pod spec (empty for compose)
    init: bool

    @property
    def where(self) -> str:
        return f"{self.workload} container {self.name}"


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(object, pod template) of every workload."""
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            yield obj, obj["spec"]["template"]


def containers(objects: list[dict[str, Any]]) -> Iterator[Container]:
    for obj, template in pod_templates(objects):
        pod = template["spec"]
        workload = f"{obj['kind']}/{obj['metadata']['name']}"
        for key, init in (("initContainers", True), ("containers", False)):
            for c in pod.get(key, []):
                yield Container(workload, c["name"], c, pod, init)


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion (an unknown variable stays as written)."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def container_env(container: Container, objects: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet would build it: values expanded in order,
    the downward API from FIELD_VALUES, Secrets as SECRET_VALUE, ConfigMaps from the render."""
    env: dict[str, str] = {}
    for var in container.spec.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[var["name"]] = FIELD_VALUES[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            env[var["name"]] = SECRET_VALUE
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = find(objects, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            raise AssertionError(f"{container.where}: env {var['name']}: unknown source {source}")
    return env


def strata_argv(container: Container, objects: list[dict[str, Any]]) -> list[str] | None:
    """The arguments of ``strata`` in this container (the image's entrypoint), expanded; None
    for a container that runs something else (a shell script, another image)."""
    if container.spec.get("command") or not container.spec["image"].split("/")[-1].startswith(
        "strata:"
    ):
        return None
    env = container_env(container, objects)
    return [expand(arg, env) for arg in container.spec.get("args", [])]


def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data
