"""Command-line arguments shared by the store-node process tests."""

from __future__ import annotations

from pathlib import Path


def ssd_args(ssd_dir: Path, *extra: str) -> tuple[str, ...]:
    """A small node with an SSD tier: 8 MiB of DRAM spilling above half full, 64 MiB of SSD."""
    return (
        "--arena-size",
        "8MiB",
        "--ssd-dir",
        str(ssd_dir),
        "--ssd-size",
        "64MiB",
        "--high-watermark",
        "0.5",
        "--low-watermark",
        "0.25",
        *extra,
    )


def cluster_args(
    url: str, node_id: str, *extra: str, heartbeat_timeout_s: float = 1.0
) -> tuple[str, ...]:
    """A cluster member with fast heartbeats (0.2 s, dead after ``heartbeat_timeout_s``)."""
    return (
        "--metadata",
        url,
        "--node-id",
        node_id,
        "--heartbeat-interval",
        "0.2s",
        "--heartbeat-timeout",
        f"{heartbeat_timeout_s:g}s",
        "--reconcile-interval",
        "0.2s",
        "--prefault",
        "false",
        *extra,
    )
