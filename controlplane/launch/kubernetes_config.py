"""The gateway's ``--k8s-*`` flags (:class:`KubernetesConfig`), apart from the Kubernetes
launcher (controlplane/launch/kubernetes.py) so that parsing a gateway's configuration loads no
Kubernetes client: ``kubernetes_asyncio`` is imported by the launcher only, and the gateway
imports the launcher only when ``--k8s-namespace`` is set (docs/design/multihost.md §7)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from controlplane.workers.roles import WorkerRole, role_name
from strata_common.options import option
from strata_common.units import parse_duration

__all__ = ["KubernetesConfig"]

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    """The gateway's Kubernetes launcher (its ``--k8s-*`` flags): off unless ``namespace`` is
    set."""

    namespace: str = option(
        "",
        metavar="NS",
        help="namespace of the prefill and decode Deployments: `strata admin scale` and "
        "`set-role` change them (enables the Kubernetes launcher; excludes --launch-store)",
    )
    prefill_deployment: str = option("strata-prefill", help="the prefill pool's Deployment")
    decode_deployment: str = option("strata-decode", help="the decode pool's Deployment")
    dry_run: bool = option(
        False,
        help="send no write to the API server: scale and set-role change nothing and reply "
        "with the requests they would send (reads are sent)",
    )
    kubeconfig: Path | None = option(
        None, help="kubeconfig file (none = the pod's service account: in-cluster config)"
    )
    removal_timeout_s: float = option(
        300.0,
        parse=parse_duration,
        help="how long a removal waits for the drained worker's pod to be gone before "
        "deleting its registry record anyway",
    )
    request_timeout_s: float = option(
        10.0, parse=parse_duration, help="deadline of each request to the API server"
    )

    def __post_init__(self) -> None:
        names = [("k8s_prefill_deployment", self.prefill_deployment, 253)]
        names.append(("k8s_decode_deployment", self.decode_deployment, 253))
        if self.namespace:
            names.append(("k8s_namespace", self.namespace, 63))
        for flag, name, limit in names:
            if len(name) > limit or not _NAME.fullmatch(name):
                raise ValueError(
                    f"{flag} must be a Kubernetes name (lower-case letters, digits and '-', "
                    f"at most {limit}), got {name!r}"
                )
        if self.prefill_deployment == self.decode_deployment:
            raise ValueError("k8s_prefill_deployment and k8s_decode_deployment must differ")
        for flag, value in (
            ("k8s_removal_timeout", self.removal_timeout_s),
            ("k8s_request_timeout", self.request_timeout_s),
        ):
            if not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}")

    @property
    def enabled(self) -> bool:
        return bool(self.namespace)

    def deployment(self, role: WorkerRole) -> str:
        if role is WorkerRole.PREFILL:
            return self.prefill_deployment
        if role is WorkerRole.DECODE:
            return self.decode_deployment
        raise ValueError(f"no pool serves role {role_name(role)}")
