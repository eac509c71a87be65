"""Exact tests of HbmBlockTranslator: vLLM KV cache events -> kvstore HBM events."""

from __future__ import annotations

import struct
from typing import Any

import blake3
import pytest
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

from dataplane.hbm_events import HbmBlockTranslator
from kvstore.blocks.hashing import PUBLIC_HASH_KEY, block_keys, root_key
from kvstore.blocks.tier import Tier
from kvstore.cluster.events import SOURCE_GONE_SEQ, BlocksRemoved, BlocksStored, SourceCleared

SOURCE = "127.0.0.1:7001"
BS = 4  # block size of these tests (vLLM's CPU engines use 128)
FINGERPRINT = bytes(range(16))
LAYOUT = "cpu/L4/H2/D32/B4/auto/torch.bfloat16"
TOKENS = list(range(100, 120))  # 5 full blocks


def root(namespace: str) -> bytes:
    return root_key(FINGERPRINT, LAYOUT, namespace)


def chain(tokens: list[int], parent: bytes) -> list[bytes]:
    """Strata keys computed independently of kvstore.blocks.hashing.block_keys."""
    keys = []
    for start in range(0, len(tokens) // BS * BS, BS):
        parent = blake3.blake3(
            parent + struct.pack(f"<{BS}I", *tokens[start : start + BS]), key=PUBLIC_HASH_KEY
        ).digest(16)
        keys.append(parent)
    return keys


def stored(
    hashes: list[Any],
    tokens: list[int],
    parent: Any = None,
    *,
    extra_keys: list[Any] | None = None,
    block_size: int = BS,
    lora_name: str | None = None,
    group_idx: int | None = None,
) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=block_size,
        lora_id=None,
        medium="GPU",
        lora_name=lora_name,
        extra_keys=extra_keys,
        group_idx=group_idx,
    )


def removed(hashes: list[Any]) -> BlockRemoved:
    return BlockRemoved(block_hashes=hashes, medium="GPU")


def vh(i: int) -> bytes:
    """A vLLM block hash (vLLM's are 32-byte sha256 digests by default)."""
    return i.to_bytes(32, "big")


@pytest.fixture
def tr() -> HbmBlockTranslator:
    translator = HbmBlockTranslator(SOURCE, BS, root)
    assert translator.clear() == SourceCleared(SOURCE, 0)
    return translator


def test_a_chain_from_the_root_gets_the_connectors_keys(tr: HbmBlockTranslator) -> None:
    keys = chain(TOKENS[:12], root(""))
    out = tr.translate([stored([vh(1), vh(2), vh(3)], TOKENS[:12])])
    assert out == [BlocksStored(SOURCE, 1, Tier.HBM, tuple(keys), None)]
    # The connector names a prompt's blocks block_keys(prompt, block_size, root(cache_salt)).
    assert keys == block_keys(TOKENS[:14], BS, root(""))
    assert tr.held_keys() == keys


def test_a_continuation_chains_on_its_parents_strata_key(tr: HbmBlockTranslator) -> None:
    tr.translate([stored([vh(1), vh(2)], TOKENS[:8])])
    out = tr.translate([stored([vh(3), vh(4)], TOKENS[8:16], parent=vh(2))])
    all_keys = chain(TOKENS[:16], root(""))
    assert out == [BlocksStored(SOURCE, 2, Tier.HBM, tuple(all_keys[2:4]), all_keys[1])]
    assert tr.held_keys() == all_keys


def test_the_cache_salt_selects_the_namespace(tr: HbmBlockTranslator) -> None:
    out = tr.translate([stored([vh(1), vh(2)], TOKENS[:8], extra_keys=[("tenant-a",), None])])
    keys = chain(TOKENS[:8], root("tenant-a"))
    assert out == [BlocksStored(SOURCE, 1, Tier.HBM, tuple(keys), None)]
    assert keys != chain(TOKENS[:8], root(""))


def test_int_hashes_work_like_bytes(tr: HbmBlockTranslator) -> None:
    tr.translate([stored([11, 12], TOKENS[:8])])
    out = tr.translate([stored([13], TOKENS[8:12], parent=12)])
    keys = chain(TOKENS[:12], root(""))
    assert out == [BlocksStored(SOURCE, 2, Tier.HBM, (keys[2],), keys[1])]


def test_removal_withdraws_exactly_the_evicted_keys(tr: HbmBlockTranslator) -> None:
    keys = chain(TOKENS[:12], root(""))
    tr.translate([stored([vh(1), vh(2), vh(3)], TOKENS[:12])])
    # vLLM evicts the tail first; an unknown hash (never announced) is ignored.
    out = tr.translate([removed([vh(3), vh(99)]), removed([vh(2)])])
    assert out == [
        BlocksRemoved(SOURCE, 2, Tier.HBM, (keys[2],)),
        BlocksRemoved(SOURCE, 3, Tier.HBM, (keys[1],)),
    ]
    assert tr.held_keys() == [keys[0]]
    assert tr.translate([removed([vh(99)])]) == []
    assert tr.next_seq == 4


def test_a_duplicate_copy_is_withdrawn_only_with_the_last_copy(tr: HbmBlockTranslator) -> None:
    keys = chain(TOKENS[:8], root(""))
    first = tr.translate([stored([vh(1), vh(2)], TOKENS[:8])])
    assert first == [BlocksStored(SOURCE, 1, Tier.HBM, tuple(keys), None)]
    # Two requests computed the same prefix at once: a second copy, announced once.
    assert tr.translate([stored([vh(1), vh(2)], TOKENS[:8])]) == []
    assert tr.translate([removed([vh(2)])]) == []
    assert tr.translate([removed([vh(2)])]) == [BlocksRemoved(SOURCE, 2, Tier.HBM, (keys[1],))]


def test_only_new_blocks_of_a_chain_are_announced_with_their_parent(
    tr: HbmBlockTranslator,
) -> None:
    keys = chain(TOKENS[:16], root(""))
    tr.translate([stored([vh(2)], TOKENS[4:8], parent=None)])  # some other chain's block
    tr.translate([stored([vh(1)], TOKENS[:4])])
    # A chain of 4 whose second block is already held: two runs, each with its own parent.
    tr.translate([removed([vh(1)])])
    other = chain(TOKENS[4:8], root(""))[0]
    out = tr.translate([stored([vh(1), vh(2), vh(3), vh(4)], TOKENS[:16])])
    assert other != keys[1]  # vh(2) kept the key it was first announced with
    assert out == [
        BlocksStored(SOURCE, 4, Tier.HBM, (keys[0],), None),
        BlocksStored(SOURCE, 5, Tier.HBM, (keys[2], keys[3]), keys[1]),
    ]


def test_all_blocks_cleared_restarts_from_nothing(tr: HbmBlockTranslator) -> None:
    tr.translate([stored([vh(1), vh(2)], TOKENS[:8])])
    assert tr.translate([AllBlocksCleared()]) == [SourceCleared(SOURCE, 2)]
    assert tr.held_keys() == []
    # Hashes are forgotten: a removal after the reset announces nothing.
    assert tr.translate([removed([vh(1)])]) == []


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(stored([vh(1)], TOKENS[:3]), id="partial-block"),
        pytest.param(stored([vh(1)], TOKENS[:8], block_size=8), id="other-block-size"),
        pytest.param(stored([vh(1)], TOKENS[:4], lora_name="adapter"), id="lora"),
        pytest.param(stored([vh(1)], TOKENS[:4], group_idx=1), id="other-kv-cache-group"),
        pytest.param(stored([vh(1)], TOKENS[:4], parent=vh(77)), id="unknown-parent"),
        pytest.param(
            stored([vh(1)], TOKENS[:4], extra_keys=[("mm-hash", 0)]), id="multimodal-first-block"
        ),
        pytest.param(
            stored([vh(1), vh(2)], TOKENS[:8], extra_keys=[None, (b"embeds",)]),
            id="per-block-extra-keys",
        ),
        pytest.param(stored([], []), id="no-blocks"),
    ],
)
def test_untranslatable_blocks_are_skipped_and_counted(
    tr: HbmBlockTranslator, event: BlockStored
) -> None:
    assert tr.translate([event]) == []
    assert tr.num_skipped == 1
    assert tr.held_keys() == []
    assert tr.next_seq == 1


def test_snapshot_and_restart_keep_the_state(tr: HbmBlockTranslator) -> None:
    keys = chain(TOKENS[:8], root(""))
    tr.translate([stored([vh(1), vh(2)], TOKENS[:8])])
    snap = tr.snapshot()
    assert (snap.source, snap.seq, dict(snap.keys_by_tier)) == (
        SOURCE,
        1,
        {Tier.HBM: tuple(keys)},
    )
    cleared, snap = tr.restart()
    assert cleared == SourceCleared(SOURCE, 2)
    assert (snap.seq, dict(snap.keys_by_tier)) == (2, {Tier.HBM: tuple(keys)})
    assert tr.held_keys() == keys


def test_leave_says_the_source_is_gone_for_good(tr: HbmBlockTranslator) -> None:
    tr.translate([stored([vh(1)], TOKENS[:4])])
    assert tr.leave() == SourceCleared(SOURCE, SOURCE_GONE_SEQ)
    assert tr.held_keys() == []


def test_snapshot_before_the_stream_started_is_refused() -> None:
    with pytest.raises(RuntimeError, match="clear"):
        HbmBlockTranslator(SOURCE, BS, root).snapshot()
    with pytest.raises(ValueError, match="block_size"):
        HbmBlockTranslator(SOURCE, 0, root)
