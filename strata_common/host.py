"""Facts about the host this process runs on."""

from __future__ import annotations

__all__ = ["boot_id"]


def boot_id() -> str:
    """This kernel boot's id ('' if unknown): two processes with equal ids share a host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
