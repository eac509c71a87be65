"""What a worker does: the one role enum of the control plane (no gRPC needed to use it).

The values are those of ``strata.worker.v1.Role`` (proto/strata_proto/worker.proto), so a role
crosses the gRPC boundary as ``role.value`` and comes back as ``WorkerRole(value)``;
tests/unit/controlplane/workers/test_roles.py checks that the two stay equal.
"""

from __future__ import annotations

import enum

__all__ = ["WorkerRole", "role_name"]


class WorkerRole(enum.Enum):
    UNSPECIFIED = 0
    PREFILL = 1
    DECODE = 2
    BOTH = 3

    def can_serve(self, wanted: WorkerRole) -> bool:
        return self is wanted or self is WorkerRole.BOTH


def role_name(role: WorkerRole) -> str:
    """``prefill``, ``decode``, ``both`` (``unspecified``): as the worker's --role, logs and
    metrics spell a role."""
    return role.name.lower()
