"""A simulated store node's events keep the prefix index exact, whatever the eviction policy."""

from __future__ import annotations

import pytest

from kvstore.blocks.tier import Tier
from kvstore.cluster.events import BlocksRemoved, BlocksStored
from kvstore.cluster.index import PrefixIndex
from kvstore.policy.factory import PolicyKind
from simulator.store import SimStoreNode
from simulator.trace import block_key


@pytest.mark.parametrize("policy", list(PolicyKind))
def test_the_index_holds_exactly_what_the_node_holds(policy: PolicyKind) -> None:
    index = PrefixIndex(initial_capacity=64)
    seq = 0

    def publish(tier: Tier, stored: tuple[bytes, ...], removed: tuple[bytes, ...]) -> None:
        nonlocal seq
        if stored:
            index.apply(BlocksStored("n", seq, tier, stored))
            seq += 1
        if removed:
            index.apply(BlocksRemoved("n", seq, tier, removed))
            seq += 1

    node = SimStoreNode("n", "h0", dram_blocks=4, ssd_blocks=0, eviction=policy, publish=publish)
    keys = [block_key(i) for i in range(24)]
    for start in range(0, 24, 6):  # batches larger than DRAM: a batch evicts its own keys
        node.put(keys[start : start + 6])
    for key in keys:
        in_node = node.tier_of(key) is not None
        in_index = index.match((key,)).depth == 1
        assert in_index == in_node, (policy, keys.index(key))
