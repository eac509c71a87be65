"""``python -m kvstore.server``: options, the node's parts (arena, SSD tier, tiers), serve until
SIGTERM or SIGINT.

It prints ``kvstore node listening on HOST:PORT`` on stdout once it accepts connections, and stops
gracefully (exit status 0, arena file removed) on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence

import uvloop

from kvstore.node.arena import Arena, remove_stale_arenas
from kvstore.node.ssd.files import tune_malloc_for_lmdb
from kvstore.node.ssd.tier import SSDTier
from kvstore.node.ssd.types import SSDTierError
from kvstore.node.store import StoreNode
from kvstore.node.tiers import TierManager
from kvstore.policy.factory import PolicyKind, make_policy
from kvstore.server.config import StoreNodeConfig
from kvstore.server.lifecycle import StoreServer
from kvstore.server.metrics import MetricsServer
from strata_common.endpoints import format_endpoint
from strata_common.tls import insecure_warning

__all__ = ["main"]

logger = logging.getLogger("kvstore.server")


async def _serve(config: StoreNodeConfig) -> int:
    loop = asyncio.get_running_loop()
    _raise_open_files_limit(config.max_connections)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for path in remove_stale_arenas(config.arena_dir):
        logger.warning("removed the arena file of a node that died: %s", path)
    ssd = _open_ssd(config)
    try:
        arena = Arena(
            config.arena_size_bytes,
            config.page_size_bytes,
            directory=config.arena_dir,
            prefault=config.prefault,
        )
    except BaseException:
        if ssd is not None:
            ssd.close()
        raise
    try:
        node = StoreNode(arena, policy=make_policy(PolicyKind(config.eviction_policy)))
        tiers = TierManager(
            node,
            ssd,
            high_watermark=config.high_watermark,
            low_watermark=config.low_watermark,
            promote=config.promote,
            write_behind=config.write_behind,
            write_through=config.write_through,
            read_threads=config.ssd_read_threads,
            sweep_interval_s=config.ssd_sweep_interval_s,
        )
        server = StoreServer(config, node, tiers)
        metrics = MetricsServer(server)
        try:  # stop() also closes the SSD tier, before the arena its threads read from
            host, port = await server.start()
            await server.join_cluster(config.advertise_address or host, port)
            if config.metrics_port is not None:
                bound = await metrics.start(config.host, config.metrics_port)
                print(f"kvstore metrics on {format_endpoint(host, bound)}", flush=True)
            print(f"kvstore node listening on {format_endpoint(host, port)}", flush=True)
            logger.info(
                "arena %s: %d bytes, page %d, max block %d",
                arena.path,
                arena.size,
                config.page_size_bytes,
                config.max_block_bytes,
            )
            await stop.wait()
            logger.info("stopping")
        finally:
            try:
                await server.stop()
            finally:
                await metrics.stop()
    finally:
        arena.close()
    return 0


FDS_BESIDES_CONNECTIONS = 128
"""Open files a node needs besides its connections (lmdb, the arena, gRPC, threads' pipes)."""


def _raise_open_files_limit(max_connections: int) -> None:
    """Raise the soft open-files limit to what ``max_connections`` need (up to the hard limit);
    warn if even that is too low: connections beyond it would fail to be accepted at all."""
    needed = max_connections + FDS_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning(
            "open-files limit %d is below --max-connections %d + %d: lower --max-connections "
            "or raise the limit (ulimit -n)",
            soft,
            max_connections,
            FDS_BESIDES_CONNECTIONS,
        )


def _open_ssd(config: StoreNodeConfig) -> SSDTier | None:
    if config.ssd_dir is None:
        return None
    if not tune_malloc_for_lmdb():
        logger.info("could not tune malloc for lmdb; SSD puts may be slower")
    ssd = SSDTier(
        config.ssd_dir,
        config.ssd_size_bytes,
        config.ssd_ttl_s,
        sync=config.ssd_sync,
        read_threads=config.ssd_read_threads,
    )
    stats = ssd.stats()
    logger.info(
        "SSD tier %s: %d blocks (%d bytes) recovered; size %d, budget %d, ttl %gs, sync %s",
        ssd.path,
        stats.num_blocks,
        stats.stored_bytes,
        stats.capacity_bytes,
        stats.budget_bytes,
        stats.ttl_s,
        stats.sync,
    )
    return ssd


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m kvstore.server``; returns the process exit status."""
    config = StoreNodeConfig.from_cli(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s kvstore[{os.getpid()}] %(name)s: %(message)s",
    )
    warning = insecure_warning(
        config.host,
        "the store node",
        secured=config.tls.enabled,
        insecure=config.insecure,
        keyed=config.cluster_key_file is not None,
    )
    if warning is not None:
        logger.warning("%s", warning)
    try:
        return int(uvloop.run(_serve(config)))
    except (OSError, SSDTierError) as exc:
        logger.error("cannot start the store node: %s", exc)
        return 1
