"""From a prefix-index match to what the scheduler needs: :func:`cached_prefix`.

The index (:class:`kvstore.cluster.match.PrefixMatch`) knows, per holder, how many leading blocks of
the prompt it holds. Holders are of two kinds: store nodes (DRAM and SSD tiers, readable by every
instance: "the pool") and engines (HBM tier, usable only by that engine). :func:`cached_prefix`
splits the match along that line:

* ``hbm_blocks[source]``: the depth of each engine's run (engines publish only HBM blocks).
* ``pool_blocks``: when no engine holds any of the blocks, the match's depth, exact even when the
  run is spread over several store nodes; otherwise the longest run of a single store node (a
  lower bound: the scheduler may then predict a little more prefill than needed, never less).
* ``pool_ssd_blocks``: blocks of that run only on SSD. For a multi-node run it is
  ``depth - depth_by_tier[DRAM]``: the blocks after the first one that is only on SSD, an upper
  bound that again errs towards predicting slower loads.
"""

from __future__ import annotations

from collections.abc import Container
from types import MappingProxyType

from controlplane.scheduling.types import NO_CACHE, CachedPrefix
from kvstore.blocks.tier import Tier
from kvstore.cluster.match import PrefixMatch

__all__ = ["cached_prefix"]


def cached_prefix(match: PrefixMatch, engine_sources: Container[str]) -> CachedPrefix:
    """Split ``match`` into the pool's run and each engine's HBM run.

    ``engine_sources``: the KV source ids of the engines (instances) known to the registry; every
    other holder is taken for a store node.
    """
    if match.depth == 0:
        return NO_CACHE
    hbm: dict[str, int] = {}
    best_store = None
    for holder in match.holders:  # by depth, descending
        if holder.holder in engine_sources:
            hbm[holder.holder] = holder.depth
        elif best_store is None:
            best_store = holder
    if not hbm:
        pool = match.depth
        ssd = pool - match.depth_by_tier[Tier.DRAM]
    elif best_store is not None:
        pool = best_store.depth
        ssd = best_store.num_blocks_by_tier[Tier.SSD]
    else:
        pool = ssd = 0
    return CachedPrefix(pool, ssd, MappingProxyType(hbm))
