"""Acceptance 5, first half: each overlay renders with ``kubectl kustomize`` (offline), and every
object it holds validates against the Kubernetes API schema of pinned versions
(``kubernetes_validate``, strict: an unknown field is an error). The custom resources, whose schemas
the package does not ship (ServiceMonitor of the Prometheus Operator, ScaledObject of KEDA), are
checked here for the fields their controllers require and for what they point at."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.integration.deploy.manifests import OVERLAYS, POOLS, find, render

#: The oldest and the newest Kubernetes minor versions the manifests are checked against: 1.32 is
#: the kubectl (and kustomize) that renders them here, 1.37 the newest schema the package ships.
K8S_VERSIONS = ("1.32.0", "1.37.0")
CUSTOM_KINDS = {
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PodMonitor",
    "keda.sh/v1alpha1/ScaledObject",
}


def _custom(obj: dict[str, Any]) -> bool:
    return f"{obj['apiVersion']}/{obj['kind']}" in CUSTOM_KINDS


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_schema(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, version: str
) -> None:
    objects = rendered[overlay]
    assert objects, f"{overlay} rendered nothing"
    errors = []
    for obj in objects:
        if _custom(obj):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert errors == []


def test_the_custom_resources_are_only_those_checked_by_hand(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    kinds = {
        f"{o['apiVersion']}/{o['kind']}"
        for objects in rendered.values()
        for o in objects
        if _custom(o)
    }
    assert kinds == CUSTOM_KINDS
    for objects in rendered.values():
        for obj in objects:
            if not _custom(obj):  # every other kind has a schema (no SchemaNotFoundError)
                kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", ["gpu", "gpu-keda"])
def test_the_service_monitor_scrapes_the_gateway_service(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    monitor = find(objects, "ServiceMonitor", "strata-gateway")
    assert monitor["metadata"]["namespace"] == "strata"
    service = find(objects, "Service", "strata-gateway")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    endpoints = monitor["spec"]["endpoints"]
    assert endpoints and all(e["port"] in ports and e["path"] == "/metrics" for e in endpoints)
    for endpoint in endpoints:
        assert re.fullmatch(r"\d+s", endpoint["interval"])


@pytest.mark.parametrize("overlay", ["gpu", "gpu-keda"])
def test_the_pod_monitor_scrapes_every_store_node(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    monitor = find(objects, "PodMonitor", "strata-store")
    assert monitor["metadata"]["namespace"] == "strata"
    store = find(objects, "DaemonSet", "strata-store")
    template = store["spec"]["template"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    container = next(c for c in template["spec"]["containers"] if c["name"] == "store")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert endpoints and all(e["path"] == "/metrics" for e in endpoints)
    for endpoint in endpoints:
        assert f"--metrics-port={ports[endpoint['port']]}" in container["args"]
        assert re.fullmatch(r"\d+s", endpoint["interval"])


def test_the_scaled_objects_scale_each_pool_from_prometheus(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["gpu-keda"]
    scaled = [o for o in objects if o["kind"] == "ScaledObject"]
    assert sorted(o["spec"]["scaleTargetRef"]["name"] for o in scaled) == sorted(POOLS)
    for obj in scaled:
        spec = obj["spec"]
        target = spec["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
        find(objects, "Deployment", target["name"])
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["triggers"]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus"
            meta = trigger["metadata"]
            assert meta["serverAddress"].startswith("http")
            assert meta["query"].strip()
            assert float(meta["threshold"]) > 0  # KEDA takes it as a string holding a number
    # Off by default: neither overlay an operator applies as is scales through KEDA.
    for overlay in ("cpu-demo", "gpu"):
        assert not [o for o in rendered[overlay] if o["kind"] == "ScaledObject"]


def test_the_secrets_kustomization_renders_valid_secrets(k8s_tree: Path) -> None:
    objects = render(k8s_tree / "secrets")
    assert {o["kind"] for o in objects} == {"Secret"}
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
        assert obj["metadata"]["namespace"] == "strata"
