"""deploy/compose.yaml, checked statically (no Docker daemon is needed): the single-host layout
is all there, every service shares the network namespace and /dev/shm of `host` (internal
ports on loopback, the workers map the store's arena), credentials come from the operator's
files as compose secrets, and containers run pinned images without root or privileges. The
command lines themselves are parsed in test_command_lines.py."""

from __future__ import annotations

import re
from typing import Any

from tests.integration.deploy.manifests import load_compose

STRATA_SERVICES = ("model", "store", "prefill", "decode", "gateway")


def _default(text: str) -> str:
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def test_the_single_host_layout_is_complete() -> None:
    services = load_compose()["services"]
    assert set(services) == {"host", "valkey", *STRATA_SERVICES}
    roles = {s["command"][1] for s in services.values() if s.get("command", [""])[0] == "worker"}
    assert roles == {"--role=prefill", "--role=decode"}
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on {dependency}"


def test_everything_shares_one_host_namespace() -> None:
    services = load_compose()["services"]
    assert services["host"]["ipc"] == "shareable"
    assert [p for p in services["host"]["ports"] if _default(p).endswith(":8000")]
    for name, service in services.items():
        if name != "host":
            assert service["network_mode"] == "service:host", name
            assert service["ipc"] == "service:host", name
            assert "ports" not in service, name


def test_credentials_are_files_mounted_as_secrets() -> None:
    compose = load_compose()
    declared = compose["secrets"]
    for secret in declared.values():
        assert set(secret) == {"file"} and secret["file"].startswith("./secrets/")
    for name, service in compose["services"].items():
        for secret in service.get("secrets", []):
            assert secret in declared, f"{name}: {secret}"
        text = str(service.get("command", "")) + str(service.get("environment", ""))
        assert "password" not in text.lower() or "/run/secrets/" in text, name
        for value in (service.get("environment") or {}).values():
            assert "redis://" not in str(value), f"{name}: a URL with a password inline"
    used = {s for svc in compose["services"].values() for s in svc.get("secrets", [])}
    assert used == set(declared)


def test_no_root_no_privilege_pinned_images() -> None:
    services: dict[str, Any] = load_compose()["services"]
    for name, service in services.items():
        image = _default(service["image"])
        tag = image.rpartition("/")[2].partition(":")[2]
        assert tag and tag != "latest", f"{name}: {image}"
        user = _default(service["user"])
        assert not user.startswith(("0:", "root")) and user.split(":")[0] != "0", name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert not service.get("privileged", False), name
