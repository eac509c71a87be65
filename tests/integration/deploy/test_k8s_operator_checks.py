"""Acceptance 5, second half: what an operator insists on, checked on every rendered overlay —
probes, resources, non-root and no privilege, pinned images, no Secret in the manifests, a
PodDisruptionBudget per pool, the scaler's RBAC exactly as wide as the launcher needs, and the
dashboard and autoscaler reading series that Strata exports."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controlplane.metrics import GatewayMetrics
from tests.integration.deploy.manifests import (
    K8S,
    OVERLAYS,
    POOLS,
    containers,
    find,
    pod_templates,
)
from tests.integration.kvstore.node_process import start_node_process

CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


@pytest.fixture(params=OVERLAYS)
def objects(request: pytest.FixtureRequest, rendered: dict[str, list[dict[str, Any]]]) -> Any:
    return rendered[request.param]


def test_every_object_is_in_the_strata_namespace(objects: list[dict[str, Any]]) -> None:
    misplaced = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in objects
        if o["kind"] not in CLUSTER_SCOPED and o["metadata"].get("namespace") != "strata"
    ]
    assert misplaced == []
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "strata"


def test_every_container_is_probed_as_ready_to_serve(objects: list[dict[str, Any]]) -> None:
    for c in containers(objects):
        if c.init:
            continue
        assert "readinessProbe" in c.spec, c.where
        assert "livenessProbe" in c.spec, c.where
        ports = {p["name"]: p["containerPort"] for p in c.spec.get("ports", [])}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.spec.get(kind)
            if probe is None:
                continue
            target = probe.get("tcpSocket") or probe.get("httpGet")
            if target is not None:  # a probe of a port the container declares
                port = target["port"]
                assert port in ports or port in ports.values(), f"{c.where} {kind} port {port}"
    # The gateway is ready when it can serve (/health: 503 until workers are ready), and is
    # not restarted for lack of workers (liveness elsewhere). Engines load slowly.
    for objs_container in containers(objects):
        spec = objs_container.spec
        if objs_container.name == "gateway":
            assert spec["readinessProbe"]["httpGet"]["path"] == "/health"
            assert spec["livenessProbe"]["httpGet"]["path"] != "/health"
        if objs_container.name == "worker":
            startup = spec["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_every_container_has_requests_and_limits(objects: list[dict[str, Any]]) -> None:
    for c in containers(objects):
        resources = c.spec.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{c.where}: {part}"


def test_every_container_runs_without_root_or_privilege(objects: list[dict[str, Any]]) -> None:
    for c in containers(objects):
        pod_sc = c.pod.get("securityContext", {})
        sc = c.spec.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, c.where
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, c.where
        assert sc.get("allowPrivilegeEscalation") is False, c.where
        assert sc.get("privileged", False) is False, c.where
        assert sc.get("readOnlyRootFilesystem") is True, c.where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], c.where
        assert "add" not in sc.get("capabilities", {}), c.where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", c.where
    for _, template in pod_templates(objects):
        assert not template["spec"].get("hostPID") and not template["spec"].get("hostIPC")


def test_images_are_pinned_by_tag(objects: list[dict[str, Any]]) -> None:
    for c in containers(objects):
        image = c.spec["image"]
        name, _, tag = image.rpartition("/")[2].partition(":")
        assert tag and tag != "latest" and "@" not in name, f"{c.where}: {image}"


def test_no_secret_is_in_the_manifests(objects: list[dict[str, Any]]) -> None:
    """Secrets come from deploy/k8s/secrets (files the operator creates), applied on its own: an
    overlay holds none, and every Secret it references is one of those."""
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Secret"] == []
    for obj in objects:
        assert "stringData" not in obj and ("data" not in obj or obj["kind"] == "ConfigMap")
    generated = {
        g["name"]
        for g in yaml.safe_load((K8S / "secrets" / "kustomization.yaml").read_text())[
            "secretGenerator"
        ]
    }
    referenced = set()
    for c in containers(objects):
        for var in c.spec.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                referenced.add(ref["name"])
    for _, template in pod_templates(objects):
        for volume in template["spec"].get("volumes", []):
            if "secret" in volume:
                referenced.add(volume["secret"]["secretName"])
            for source in volume.get("projected", {}).get("sources", []):
                if "secret" in source:
                    referenced.add(source["secret"]["name"])
    assert referenced == generated
    for c in containers(objects):
        assert_no_inline_credential(c.where, c.spec)


SECRET_WORD = re.compile(r"password|passwd|secret|token|api-key", re.I)
URL_PASSWORD = re.compile(r"://[^/@\s]*:([^/@\s]+)@")
VAR_REF = re.compile(r"^\$\(([A-Za-z_][A-Za-z0-9_]*)\)$")


def assert_no_inline_credential(where: str, spec: dict[str, Any]) -> None:
    """No credential on a command line, and none in an env value: a password in a URL must be
    ``$(VAR)`` with VAR an env var of the same container taken from a Secret (secretKeyRef), and
    no argument is a password/token/secret/API-key flag (files or the environment carry those)."""
    from_secret = {
        var["name"] for var in spec.get("env", []) if "secretKeyRef" in var.get("valueFrom", {})
    }
    texts = [str(a) for a in [*spec.get("command", []), *spec.get("args", [])]]
    for text in texts:
        flag = text.split("=", 1)[0]
        inline = flag.startswith("-") and not flag.endswith(("-file", "-dir", "-path"))
        assert not (inline and SECRET_WORD.search(flag)), (
            f"{where}: a credential flag on the command line: {text}"
        )
    texts += [str(var.get("value", "")) for var in spec.get("env", [])]
    for text in texts:
        for password in URL_PASSWORD.findall(text):
            ref = VAR_REF.match(password)
            assert ref is not None and ref.group(1) in from_secret, (
                f"{where}: a URL with an inline password: {text}"
            )


@pytest.mark.parametrize(
    ("spec", "bad"),
    [
        ({"args": ["--registry=redis://:hunter2@redis:6379/0"]}, True),
        ({"env": [{"name": "R", "value": "redis://u:hunter2@redis:6379"}]}, True),
        ({"args": ["--admin-token=abc"]}, True),
        ({"args": ["--api-key", "sk-1"]}, True),
        ({"args": ["--registry=redis://:$(PW)@redis:6379/0"]}, True),  # PW not from a Secret
        (
            {
                "args": ["--registry=redis://:$(PW)@redis:6379/0", "--api-keys-file=/f"],
                "env": [{"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
            },
            False,
        ),
        ({"args": ["--registry=redis://redis:6379/0", "--cluster-key-file=/k"]}, False),
    ],
)
def test_the_inline_credential_check_catches_what_it_should(
    spec: dict[str, Any], bad: bool
) -> None:
    if bad:
        with pytest.raises(AssertionError):
            assert_no_inline_credential("test", spec)
    else:
        assert_no_inline_credential("test", spec)


def test_every_configmap_a_pod_uses_is_rendered(objects: list[dict[str, Any]]) -> None:
    names = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    for _, template in pod_templates(objects):
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in names


def test_each_pool_and_the_gateway_have_a_disruption_budget(objects: list[dict[str, Any]]) -> None:
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    for name in (*POOLS, "strata-gateway"):
        labels = find(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        matching = [
            b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(matching) == 1, name
        # One at a time, and never a budget that a single replica could not meet (a drain of
        # its node would wait forever).
        assert matching[0]["spec"] == {
            "maxUnavailable": 1,
            "selector": matching[0]["spec"]["selector"],
        }


#: What the Kubernetes launcher calls (docs/design/multihost.md §7, its RBAC table): the scale
#: subresource of the two pool Deployments (GET, PUT with the resourceVersion read) and pods
#: (list by the pool's selector, a strategic merge patch of the deletion-cost annotation, DELETE
#: with a uid precondition). Nothing cluster-wide, no Deployment, no Secret, no other verb.
SCALER_RULES = {
    ("apps", "deployments/scale", ("strata-decode", "strata-prefill")): {"get", "update"},
    ("", "pods", ()): {"list", "patch", "delete"},
}


def test_the_scaler_role_grants_exactly_what_the_launcher_needs(
    objects: list[dict[str, Any]],
) -> None:
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = [o for o in objects if o["kind"] == "Role"]
    assert [r["metadata"]["name"] for r in roles] == ["strata-scaler"]
    granted: dict[tuple[str, str, tuple[str, ...]], set[str]] = {}
    for rule in roles[0]["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                key = (group, resource, tuple(sorted(rule.get("resourceNames", []))))
                granted.setdefault(key, set()).update(rule["verbs"])
    assert granted == SCALER_RULES
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    assert len(bindings) == 1
    assert bindings[0]["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "strata-scaler",
    }
    assert bindings[0]["subjects"] == [
        {"kind": "ServiceAccount", "name": "strata-gateway", "namespace": "strata"}
    ]
    # Only the gateway holds a service account token; the others run without one.
    for obj, template in pod_templates(objects):
        spec = template["spec"]
        if obj["metadata"]["name"] == "strata-gateway":
            assert spec["serviceAccountName"] == "strata-gateway"
        else:
            assert spec.get("automountServiceAccountToken") is False, obj["metadata"]["name"]


def test_the_scalers_pod_patches_are_held_to_the_deletion_cost(
    objects: list[dict[str, Any]],
) -> None:
    """`patch pods` would let the gateway rewrite any pod: an admission policy, bound to deny,
    admits its pod updates only on pool pods and only when nothing but the pod-deletion-cost
    annotation changes (deploy/k8s/base/scaler-admission.yaml)."""
    (policy,) = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert policy["apiVersion"] == binding["apiVersion"] == "admissionregistration.k8s.io/v1"
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["pods"]}
    ]
    # The scaler's account: the subject of the RoleBinding, in the namespace of the request.
    (role_binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    (subject,) = role_binding["subjects"]
    (condition,) = spec["matchConditions"]
    assert condition["expression"].split() == [
        "request.userInfo.username",
        "==",
        '"system:serviceaccount:"',
        "+",
        "request.namespace",
        "+",
        f'":{subject["name"]}"',
    ]
    assert subject["namespace"] == "strata"
    variables = {v["name"]: v["expression"] for v in spec["variables"]}
    assert variables["cost"] == '"controller.kubernetes.io/pod-deletion-cost"'
    pools, unchanged = (" ".join(v["expression"].split()) for v in spec["validations"])
    assert '["prefill", "decode"]' in pools
    for kept in ("object.spec == oldObject.spec", "variables.newLabels == variables.oldLabels"):
        assert kept in unchanged
    assert "k == variables.cost ||" in unchanged
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }
    # The pools' pods carry the labels the policy admits.
    components = {
        t["metadata"]["labels"]["app.kubernetes.io/component"]
        for o, t in pod_templates(objects)
        if o["metadata"]["name"] in POOLS
    }
    assert components == {"prefill", "decode"}


def test_gpus_are_requested_in_the_gpu_overlay_only(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for overlay, objects in rendered.items():
        for c in containers(objects):
            gpus = c.spec["resources"]["limits"].get("nvidia.com/gpu")
            if overlay.startswith("gpu") and c.name == "worker":
                assert gpus == "1" and c.spec["resources"]["requests"]["nvidia.com/gpu"] == "1"
            else:
                assert gpus is None, f"{overlay}: {c.where}"


def test_the_workers_share_their_hosts_store_node(objects: list[dict[str, Any]]) -> None:
    """Workers dial the store node on their host's address and the node's host port (what the
    node registers for its peers too), and map its arena: the host's /dev/shm mounted where the
    node's --arena-dir says, the same user (the arena file is 0600). The engines' own shared
    memory is the pod's (an emptyDir at /dev/shm), never the host's: what a crashed engine
    leaves there goes with its pod."""
    store = find(objects, "DaemonSet", "strata-store")["spec"]["template"]["spec"]
    (store_port,) = [p for p in store["containers"][0]["ports"] if p["name"] == "store"]
    assert store_port["hostPort"] == store_port["containerPort"]
    assert "--advertise-address=$(HOST_IP)" in store["containers"][0]["args"]
    shm = {v["name"]: v for v in store["volumes"]}["host-shm"]["hostPath"]["path"]
    arena_dir = next(
        a.split("=", 1)[1] for a in store["containers"][0]["args"] if a.startswith("--arena-dir=")
    )
    mounts = {m["name"]: m["mountPath"] for m in store["containers"][0]["volumeMounts"]}
    assert mounts["host-shm"] == arena_dir
    for pool in POOLS:
        spec = find(objects, "Deployment", pool)["spec"]["template"]["spec"]
        worker = next(c for c in spec["containers"] if c["name"] == "worker")
        assert f"--store=$(HOST_IP):{store_port['hostPort']}" in worker["args"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["host-shm"]["hostPath"]["path"] == shm
        mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
        assert mounts["host-shm"] == arena_dir  # the arena file at the path the node reports
        shm_mount = next(name for name, path in mounts.items() if path == "/dev/shm")
        assert volumes[shm_mount]["emptyDir"]["medium"] == "Memory"
        assert spec["securityContext"]["runAsUser"] == store["securityContext"]["runAsUser"]


def _series_names(store_metrics: str) -> set[str]:
    """Every series name the gateway exports, and those a real store node's /metrics serves."""
    names = set()
    for family in GatewayMetrics().registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(family.name)
    with urllib.request.urlopen(f"http://{store_metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
    return names


def _queried(text: str) -> set[str]:
    return set(re.findall(r"\bstrata_[a-z0-9_]+", text))


def test_the_dashboard_and_autoscaler_read_series_strata_exports(tmp_path: Path) -> None:
    node = start_node_process(tmp_path / "node.log", "--arena-size", "8MiB", "--metrics-port", "0")
    try:
        assert node.metrics is not None
        exported = _series_names(node.metrics)
    finally:
        node.stop()
    assert "strata_store_hits_total" in exported
    dashboard = (K8S / "components/monitoring/strata-dashboard.json").read_text()
    keda = (K8S / "components/keda/scaledobjects.yaml").read_text()
    for text in (dashboard, keda):
        queried = _queried(text)
        assert queried and queried <= exported, queried - exported


def test_the_dashboard_has_the_panels_operators_look_for() -> None:
    import json

    dashboard = json.loads((K8S / "components/monitoring/strata-dashboard.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert {
        "Time to first token",
        "Time per output token",
        "Goodput",
        "Queue and admission",
        "Cache hits by tier",
        "KV transfer",
        "Predictor error",
        "Pool sizes",
    } <= titles
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])


def test_the_overlays_directory_holds_only_rendered_overlays() -> None:
    on_disk = {p.name for p in (K8S / "overlays").iterdir() if p.is_dir()}
    assert on_disk <= set(OVERLAYS)
    assert Path(K8S / "base" / "kustomization.yaml").is_file()


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_network_policies_admit_exactly_the_callers_of_each_port(
    objects: list[dict[str, Any]],
) -> None:
    """Redis from every Strata component that uses it, workers' gRPC from gateways only; each
    policy's port is one its pods listen on."""
    pods = {
        obj["metadata"]["name"]: template["metadata"]["labels"]
        for obj, template in pod_templates(objects)
    }
    ports = {
        obj["metadata"]["name"]: {
            p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
        }
        for obj, template in pod_templates(objects)
    }
    expected = {
        "strata-redis": ({"strata-redis"}, {"strata-gateway", *POOLS, "strata-store"}),
        "strata-workers": (set(POOLS), {"strata-gateway"}),
    }
    policies = {o["metadata"]["name"]: o for o in objects if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {*expected, "strata-store"}
    # The store: its port open to all (TLS guards it: pod policies do not see host ports),
    # its metrics port only from the monitoring namespace.
    store = policies["strata-store"]["spec"]
    assert {p for p, labels in pods.items() if _selects(store["podSelector"], labels)} == {
        "strata-store"
    }
    open_rule, metrics_rule = store["ingress"]
    assert "from" not in open_rule and [p["port"] for p in open_rule["ports"]] == [7600]
    assert [p["port"] for p in metrics_rule["ports"]] == [7601]
    assert {p["port"] for r in store["ingress"] for p in r["ports"]} <= ports["strata-store"]
    (monitoring,) = metrics_rule["from"]
    assert set(monitoring) == {"namespaceSelector"}
    for name, (targets, callers) in expected.items():
        spec = policies[name]["spec"]
        assert {p for p, labels in pods.items() if _selects(spec["podSelector"], labels)} == targets
        (rule,) = spec["ingress"]
        (peer,) = rule["from"]
        admitted = {p for p, labels in pods.items() if _selects(peer["podSelector"], labels)}
        assert admitted == callers, name
        for target in targets:
            assert {p["port"] for p in rule["ports"]} <= ports[target], name
