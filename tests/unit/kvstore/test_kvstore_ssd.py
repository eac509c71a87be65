"""Exact tests of the SSD tier (kvstore.node.ssd): put/get/delete, TTL, checksums, capacity,
restart."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import pytest

from kvstore.blocks.format import BLOCK_HEADER_BYTES, encode_header
from kvstore.node.ssd.files import SSD_FORMAT
from kvstore.node.ssd.tier import SSDTier
from kvstore.node.ssd.types import ReadStatus, SSDTierError
from tests.fakes import FakeClock

MIB = 1024 * 1024
SIZE = 16 * MIB  # the smallest tier: budget 11 744 052 bytes


def key(n: int) -> bytes:
    return n.to_bytes(16, "big")


def block(n: int, nbytes: int = 10_000) -> bytes:
    """A valid stored block (header + payload) of ``nbytes`` in all."""
    payload = bytes((n * 7 + i) % 251 for i in range(nbytes - BLOCK_HEADER_BYTES))
    return encode_header(key(n), payload) + payload


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000_000.0)


@pytest.fixture
def open_tier(tmp_path: Path, clock: FakeClock) -> Iterator[Callable[..., SSDTier]]:
    """Factory for tiers on one directory; every tier it opened is closed at teardown."""
    opened: list[SSDTier] = []

    def factory(**kwargs: object) -> SSDTier:
        options: dict[str, object] = {"ttl_s": 100.0, "sync": "none", "clock": clock}
        options.update(kwargs)
        tier = SSDTier(str(tmp_path / "ssd"), SIZE, **options)  # type: ignore[arg-type]
        opened.append(tier)
        return tier

    yield factory
    for tier in opened:
        tier.close()


def stored(tier: SSDTier) -> list[int]:
    return [int.from_bytes(k, "big") for k in tier.iter_keys()]


def raw_env(tier_dir: Path) -> lmdb.Environment:
    return lmdb.open(str(tier_dir), map_size=SIZE, max_dbs=3)


def test_put_get_delete_roundtrip(open_tier: Callable[..., SSDTier]) -> None:
    tier = open_tier()
    assert tier.put_many([(key(n), block(n)) for n in range(3)]) == [True, True, True]
    assert tier.get(key(1)) == block(1)
    assert tier.lookup(key(2)) == 10_000
    assert (tier.contains(key(0)), tier.contains(key(9)), tier.get(key(9))) == (True, False, None)
    assert tier.contains_many([key(0), key(9), key(2)]) == [True, False, True]
    assert stored(tier) == [0, 1, 2]
    assert tier.delete([key(1), key(9)]) == 1
    assert (tier.get(key(1)), stored(tier), len(tier)) == (None, [0, 2], 2)
    stats = tier.stats()
    assert (stats.num_blocks, stats.stored_bytes, stats.writes, stats.deletes) == (2, 20_000, 3, 1)
    assert stats.used_bytes == 2 * tier.block_cost(10_000) == 2 * (3 * 4096 + 128)
    assert (stats.reads, stats.read_bytes) == (1, 10_000)


def test_read_into_fills_the_destination_once(open_tier: Callable[..., SSDTier]) -> None:
    tier = open_tier()
    tier.put(key(5), block(5))
    dest = bytearray(12_000)
    result = tier.read_into(key(5), memoryview(dest))
    assert (result.status, result.nbytes) == (ReadStatus.OK, 10_000)
    assert bytes(dest[:10_000]) == block(5) and bytes(dest[10_000:]) == bytes(2000)
    assert tier.read_into(key(6), memoryview(dest)).status is ReadStatus.MISS
    with pytest.raises(ValueError):
        tier.read_into(key(5), memoryview(bytearray(100)))  # a caller bug, not corruption
    assert tier.contains(key(5))


def test_ttl_expires_blocks_and_the_sweep_removes_them(
    open_tier: Callable[..., SSDTier], clock: FakeClock
) -> None:
    tier = open_tier(ttl_s=100.0)
    tier.put(key(0), block(0))
    clock.now += 40
    tier.put(key(1), block(1))
    assert tier.remaining_ttl(key(0)) == pytest.approx(60.0)
    clock.now += 59.9  # key 0 has 0.1 s left
    assert (tier.contains(key(0)), tier.sweep_expired()) == (True, 0)
    clock.now += 0.1  # exactly 100 s after it was written
    assert (tier.contains(key(0)), tier.get(key(0)), tier.remaining_ttl(key(0))) == (
        False,
        None,
        None,
    )
    assert stored(tier) == [1]
    assert len(tier) == 2  # still in the file until the sweep
    assert tier.sweep_expired() == 1
    assert (len(tier), tier.stats().expired) == (1, 1)
    tier.put(key(1), block(1))  # re-put restarts the TTL
    clock.now += 99
    assert tier.sweep_expired() == 0 and tier.contains(key(1))


def test_expired_blocks_are_removed_at_open_and_shorter_ttl_applies(
    open_tier: Callable[..., SSDTier], clock: FakeClock
) -> None:
    tier = open_tier(ttl_s=100.0)
    tier.put(key(0), block(0))
    clock.now += 50
    tier.put(key(1), block(1))
    tier.close()
    clock.now += 60  # key 0 expired while the node was down
    tier = open_tier(ttl_s=10.0)  # key 1 had 90 s left; the new TTL caps it at 10 s
    stats = tier.stats()
    assert (stored(tier), stats.expired, stats.recovered_blocks) == ([1], 1, 1)
    assert tier.remaining_ttl(key(1)) == pytest.approx(10.0)
    tier.close()
    with raw_env(Path(tier.path)) as env, env.begin() as txn:
        assert txn.get(key(0), db=env.open_db(b"blocks", txn=txn)) is None


@pytest.mark.parametrize("damage", ["payload", "header", "other-key"])
def test_corrupt_block_is_a_miss_and_is_deleted(
    open_tier: Callable[..., SSDTier], damage: str
) -> None:
    tier = open_tier()
    tier.put_many([(key(n), block(n)) for n in range(3)])
    tier.close()
    with raw_env(Path(tier.path)) as env, env.begin(write=True) as txn:
        blocks = env.open_db(b"blocks", txn=txn)
        value = bytearray(txn.get(key(1), db=blocks))
        if damage == "payload":
            value[5000] ^= 0x01
        elif damage == "header":
            value[0:4] = b"XXXX"
        else:
            value[:] = block(2)  # a valid block, but not the one named key 1
        txn.put(key(1), bytes(value), db=blocks)
    tier = open_tier()
    assert tier.contains(key(1))  # the audit at open reads no payloads
    assert tier.get(key(1)) is None
    assert (tier.contains(key(1)), tier.stats().corrupt_dropped) == (False, 1)
    assert [tier.get(key(n)) == block(n) for n in (0, 2)] == [True, True]
    tier.close()
    tier = open_tier()  # deleted from the file, not just hidden
    assert (stored(tier), tier.stats().audit_repaired) == ([0, 2], 0)


def test_corrupt_value_written_through_the_api_is_caught_on_read(
    open_tier: Callable[..., SSDTier],
) -> None:
    tier = open_tier()
    bad = bytearray(block(4))
    bad[-1] ^= 0xFF
    assert tier.put(key(4), bytes(bad))  # put does not verify: its source (DRAM) was verified
    dest = memoryview(bytearray(10_000))
    assert tier.read_into(key(4), dest).status is ReadStatus.CORRUPT
    assert (tier.contains(key(4)), tier.purge_pending(), len(tier)) == (False, 1, 0)


def test_audit_repairs_orphans_and_verifies_checksums(open_tier: Callable[..., SSDTier]) -> None:
    tier = open_tier()
    tier.put_many([(key(n), block(n)) for n in range(5)])
    tier.close()
    with raw_env(Path(tier.path)) as env, env.begin(write=True) as txn:
        blocks = env.open_db(b"blocks", txn=txn)
        meta = env.open_db(b"meta", txn=txn)
        txn.delete(key(0), db=meta)  # orphan block
        txn.delete(key(1), db=blocks)  # orphan meta
        txn.delete(key(3), db=blocks)  # orphan meta
        value = bytearray(txn.get(key(2), db=blocks))
        value[100] ^= 0x10
        txn.put(key(2), bytes(value), db=blocks)  # bad checksum, found only by verification
    tier = open_tier()  # 3 blocks but 4 meta records: the open runs the full audit
    assert (stored(tier), tier.stats().audit_repaired) == ([2, 4], 3)
    report = tier.audit(repair=True, verify_checksums=True)
    assert (report.blocks, report.corrupt, report.orphan_meta, report.orphan_blocks) == (1, 1, 0, 0)
    assert (stored(tier), tier.stats().corrupt_dropped) == ([4], 1)


def test_symmetric_orphans_heal_on_read_or_explicit_audit(
    open_tier: Callable[..., SSDTier],
) -> None:
    tier = open_tier()
    tier.put_many([(key(n), block(n)) for n in range(3)])
    tier.close()
    with raw_env(Path(tier.path)) as env, env.begin(write=True) as txn:
        txn.delete(key(0), db=env.open_db(b"meta", txn=txn))  # orphan block
        txn.delete(key(1), db=env.open_db(b"blocks", txn=txn))  # orphan meta
    tier = open_tier()  # equal counts: the open trusts them
    assert stored(tier) == [1, 2]
    assert tier.get(key(1)) is None and stored(tier) == [2]  # the stale entry is dropped
    report = tier.audit(repair=True)
    assert (report.orphan_blocks, report.orphan_meta, report.blocks) == (1, 0, 1)
    tier.close()
    with raw_env(Path(tier.path)) as env, env.begin() as txn:
        assert txn.stat(env.open_db(b"blocks", txn=txn))["entries"] == 1


def test_capacity_evicts_in_lru_order(open_tier: Callable[..., SSDTier]) -> None:
    tier = open_tier()
    nbytes = MIB
    fits = tier.budget_bytes // tier.block_cost(nbytes)
    assert (tier.budget_bytes, tier.block_cost(nbytes), fits) == (11_744_052, 1_052_800, 11)
    for n in range(11):
        assert tier.put(key(n), block(n, nbytes))
    assert stored(tier) == list(range(11))
    assert tier.get(key(0)) is not None  # 0 becomes the most recently used
    assert tier.put(key(11), block(11, nbytes))  # evicts 1
    assert tier.put_many([(key(12), block(12, nbytes)), (key(13), block(13, nbytes))]) == [
        True,
        True,
    ]  # evicts 2 and 3, in the same transaction
    assert sorted(stored(tier)) == [0, *range(4, 14)]
    assert tier.stats().evictions == 3
    assert tier.stats().used_bytes == 11 * 1_052_800 <= tier.budget_bytes
    big = 12 * MIB  # larger than the whole budget: refused, nothing evicted
    assert tier.put(key(99), block(99, big)) is False
    assert (tier.stats().write_failures, len(tier)) == (1, 11)


def test_restart_serves_blocks_again_in_the_same_order(
    open_tier: Callable[..., SSDTier], clock: FakeClock
) -> None:
    tier = open_tier()
    for n in (3, 1, 2):
        clock.now += 1
        tier.put(key(n), block(n, MIB))
    tier.close()
    tier = open_tier()
    assert (stored(tier), tier.stats().recovered_blocks) == ([3, 1, 2], 3)
    assert [tier.get(key(n)) == block(n, MIB) for n in (1, 2, 3)] == [True, True, True]
    tier.close()
    # Recency is rebuilt in write order: 13 blocks for 11 places evict 3, then 1.
    tier = open_tier()
    for n in range(10, 20):
        clock.now += 1
        tier.put(key(n), block(n, MIB))
    assert stored(tier) == [2, *range(10, 20)]


def test_one_node_per_directory(open_tier: Callable[..., SSDTier]) -> None:
    tier = open_tier()
    with pytest.raises(SSDTierError, match="in use"):
        open_tier()
    tier.close()
    open_tier().close()


def test_foreign_format_and_unreadable_files_start_empty(
    open_tier: Callable[..., SSDTier], tmp_path: Path
) -> None:
    tier = open_tier()
    tier.put(key(1), block(1))
    tier.close()
    with raw_env(tmp_path / "ssd") as env, env.begin(write=True) as txn:
        txn.put(b"format", b"someone-else/7", db=env.open_db(b"info", txn=txn))
    tier = open_tier()
    assert len(tier) == 0
    tier.put(key(2), block(2))
    tier.close()
    (tmp_path / "ssd" / "data.mdb").write_bytes(b"not an lmdb file" * 1000)
    tier = open_tier()
    assert len(tier) == 0 and tier.put(key(3), block(3)) and tier.get(key(3)) == block(3)
    tier.close()
    with raw_env(tmp_path / "ssd") as env, env.begin() as txn:  # the format marker was written
        assert txn.get(b"format", db=env.open_db(b"info", txn=txn)) == SSD_FORMAT


def test_a_queued_write_of_a_deleted_key_is_not_resurrected(
    open_tier: Callable[..., SSDTier],
) -> None:
    """unindex (loop thread) then a write batch queued before it, then the purge (FIFO)."""
    tier = open_tier()
    tier.put(key(1), block(1))
    assert tier.unindex([key(1), key(2)]) == [key(1)]
    assert tier.put(key(1), block(1))  # the spill that was already queued
    assert tier.contains(key(1)) is False
    assert tier.purge_pending() == 1
    tier.put(key(1), block(1))  # a later write is a new block again
    assert tier.contains(key(1))
    tier.close()
    assert stored(open_tier()) == [1]


def test_ssd_options_from_cli_and_environment(tmp_path: Path) -> None:
    from kvstore.server.config import StoreNodeConfig

    argv = ["--ssd-dir", str(tmp_path), "--ssd-size", "1GiB", "--ssd-ttl", "24h", "--no-promote"]
    argv += ["--high-watermark", "0.8", "--low-watermark", "0.6", "--ssd-sync", "full"]
    config = StoreNodeConfig.from_cli(argv, env={"STRATA_KVSTORE_SSD_READ_THREADS": "2"})
    assert config == StoreNodeConfig(
        ssd_dir=str(tmp_path),
        ssd_size_bytes=1024**3,
        ssd_ttl_s=86400.0,
        ssd_sync="full",
        ssd_read_threads=2,
        high_watermark=0.8,
        low_watermark=0.6,
        promote=False,
    )
    defaults = StoreNodeConfig.from_cli([], env={})
    assert (defaults.ssd_dir, defaults.ssd_ttl_s, defaults.promote) == (None, 86400.0, True)
    assert (defaults.high_watermark, defaults.low_watermark, defaults.ssd_sync) == (
        0.9,
        0.75,
        "data",
    )
    assert StoreNodeConfig.from_cli([], env={"STRATA_KVSTORE_SSD_DIR": "none"}).ssd_dir is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--high-watermark", "0.5", "--low-watermark", "0.5"],
        ["--high-watermark", "1.5"],
        ["--low-watermark", "0"],
        ["--ssd-size", "1MiB"],
        ["--ssd-ttl", "0s"],
        ["--ssd-sync", "sometimes"],
        ["--ssd-read-threads", "0"],
        ["--ssd-dir", "/etc/hostname"],
    ],
)
def test_ssd_options_rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from kvstore.server.config import StoreNodeConfig

    with pytest.raises(SystemExit) as excinfo:
        StoreNodeConfig.from_cli(argv, env={})
    assert excinfo.value.code == 2
    assert "error" in capsys.readouterr().err


def test_lmdb_map_full_is_survived_by_evicting_more(
    open_tier: Callable[..., SSDTier], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If lmdb runs out of map before the budget says so (fragmentation), evict and retry."""
    tier = open_tier()
    monkeypatch.setattr(tier, "_budget", 4 * SIZE)  # a budget lmdb cannot honour
    written = [tier.put(key(n), block(n, MIB)) for n in range(40)]  # 40 MiB into a 16 MiB map
    stats = tier.stats()
    assert all(written) and stats.map_full_retries >= 1 and stats.write_failures == 0
    assert stats.evictions > 0 and len(tier) == 40 - stats.evictions
    newest = stored(tier)
    assert newest == list(range(40 - len(newest), 40))  # the oldest went first
    assert all(tier.get(key(n)) == block(n, MIB) for n in newest)
