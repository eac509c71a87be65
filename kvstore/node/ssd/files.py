"""The SSD tier's files: the lmdb environment (open, lock, format), the meta record, block checks,
and the kernel hints (madvise, malloc tuning) its reads and writes depend on.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import math
import os
import struct
from collections.abc import Callable
from typing import Any

import lmdb
import numpy as np

from kvstore.blocks.format import BLOCK_HEADER_BYTES, BlockFormatError, BlockHeader, verify
from kvstore.blocks.hashing import BLOCK_KEY_BYTES
from kvstore.node.ssd.types import AuditReport, Meta, SSDTierError

logger = logging.getLogger("kvstore.node.ssd")

__all__ = [
    "LOCK_FILE",
    "SSD_FORMAT",
    "SYNC_MODES",
    "audit_files",
    "check_format",
    "open_environment",
    "prefetch",
    "take_directory_lock",
    "tune_malloc_for_lmdb",
    "write_batch_limit",
]


SSD_FORMAT = b"strata-kvstore-ssd/2"
"""Stored in the ``info`` database; a directory with another format is emptied at open. /2: the
blocks are in block format v2 (kvstore.blocks.format), whose checksum covers the header."""


LOCK_FILE = "strata-ssd.lock"


SYNC_MODES = ("data", "full", "none")


MIB = 1024 * 1024


_META = struct.Struct("<QQdd")  # block length, write sequence number, stored-at, expires-at


LMDB_PAGE_HEADER = 16  # an overflow run starts with one page header


ENTRY_OVERHEAD = 128  # leaf nodes in ``blocks`` and ``meta`` (key, node header, page number)


_MAX_WRITE_BATCH = 64 * MIB


NODE_HEADER = struct.Struct("<HHHH")  # lmdb MDB_node: mn_lo, mn_hi, mn_flags, mn_ksize


F_BIGDATA = 0x01  # the value lives on overflow pages; the page number follows the key


PAGE_NUMBER = struct.Struct("<Q")


MADV_WILLNEED = 3


_BROKEN_FILE_ERRORS = (
    lmdb.CorruptedError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.PanicError,
    lmdb.PageNotFoundError,
)


def write_batch_limit(capacity_bytes: int) -> int:
    """Bytes per write transaction for a tier of ``capacity_bytes``: 1/16 of it, 1-64 MiB.

    Big enough that one ``fdatasync`` per commit is amortised (a 64 MiB batch takes ~30 ms to
    write at disk speed), small enough that the headroom lmdb needs for a batch is a small part
    of a small tier.
    """
    return max(MIB, min(_MAX_WRITE_BATCH, capacity_bytes // 16))


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


madvise = _libc_madvise()


def mapping_start(path: str, length: int) -> int | None:
    """Address at which this process maps ``path`` from offset 0 over ``length`` bytes."""
    try:
        st = os.stat(path)
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or int(fields[4]) != st.st_ino or int(fields[2], 16) != 0:
                    continue
                major, minor = (int(x, 16) for x in fields[3].split(":"))
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if (major, minor) == (os.major(st.st_dev), os.minor(st.st_dev)) and (
                    end - start >= length
                ):
                    return start
    except (OSError, ValueError):
        pass
    return None


def tune_malloc_for_lmdb() -> bool:
    """Make glibc keep large allocations on the heap; True if it took effect.

    lmdb (without ``writemap``) ``malloc``s the dirty overflow pages of every put and frees them
    at commit. With glibc's default thresholds each such buffer is a fresh ``mmap`` whose pages
    fault in at ~0.5 GB/s here, so batched puts ran at 0.6 GB/s instead of 2.9 GB/s
    (/work/shared/notes/machine-limits.md). Process-wide, so the server calls it, not the library.
    """
    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(m_mmap_threshold, 32 * MIB)) and bool(mallopt(m_trim_threshold, 1 << 30))


def is_block(key: bytes, block: memoryview) -> bool:
    """True if ``block`` is a well-formed block named ``key`` whose payload matches its checksum."""
    try:
        header = BlockHeader.decode(block)
    except BlockFormatError:
        return False
    return (
        header.key == key
        and BLOCK_HEADER_BYTES + header.payload_nbytes == block.nbytes
        and verify(header, block[BLOCK_HEADER_BYTES:])
    )


def encode_meta(meta: Meta) -> bytes:
    return _META.pack(meta.nbytes, meta.seq, meta.stored_at_s, meta.expires_at_s)


def decode_meta(raw: bytes | memoryview) -> Meta | None:
    if len(raw) != _META.size:
        return None
    nbytes, seq, stored_at, expires_at = _META.unpack(raw)
    if nbytes < BLOCK_HEADER_BYTES or not (math.isfinite(stored_at) and math.isfinite(expires_at)):
        return None
    return Meta(nbytes, seq, stored_at, expires_at)


def check_key(key: bytes) -> None:
    if len(key) != BLOCK_KEY_BYTES:
        raise ValueError(f"block keys are {BLOCK_KEY_BYTES} bytes, got {len(key)}")


def take_directory_lock(path: str) -> int:
    """Hold the directory's lock file: one store node per SSD directory."""
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SSDTierError(f"SSD directory {path} is in use by another store node") from None
    return fd


def open_environment(path: str, capacity: int, sync: str, read_threads: int) -> lmdb.Environment:
    """Open (or, if unreadable, recreate) the lmdb environment of an SSD tier."""
    try:
        try:
            return _lmdb_open(path, capacity, sync, read_threads)
        except _BROKEN_FILE_ERRORS as exc:
            # A cache: an unreadable file is replaced, not repaired.
            logger.error("SSD tier %s is unreadable (%s); starting it empty", path, exc)
            for name in ("data.mdb", "lock.mdb"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(path, name))
            return _lmdb_open(path, capacity, sync, read_threads)
    except lmdb.Error as exc:
        raise SSDTierError(f"cannot open the SSD tier {path}: {exc}") from exc


def _lmdb_open(path: str, capacity: int, sync: str, read_threads: int) -> lmdb.Environment:
    env = lmdb.open(
        path,
        map_size=capacity,
        subdir=True,
        max_dbs=3,
        sync=sync != "none",
        metasync=sync == "full",
        readahead=False,  # exact faults; reads prefetch their own pages (_prefetch)
        writemap=False,  # writemap made puts 4x slower here
        meminit=False,  # overflow pages are filled by the value; do not zero them first
        mode=0o600,
        max_readers=126,
        max_spare_txns=read_threads + 1,
        lock=True,
    )
    try:
        stale = env.reader_check()  # reader slots of a node that died mid-read
    except lmdb.Error:
        env.close()
        raise
    if stale:
        logger.info("SSD tier %s: cleared %d stale reader slots", path, stale)
    return env


def check_format(env: lmdb.Environment, path: str, info: Any, blocks: Any, meta: Any) -> None:
    """Empty a tier written in another format; stamp the format."""
    with env.begin(write=True) as txn:
        found = txn.get(b"format", db=info)
        if found == SSD_FORMAT:
            return
        if found is not None or txn.stat(blocks)["entries"]:
            logger.warning(
                "SSD tier %s has format %r, not %r; emptying it", path, found, SSD_FORMAT
            )
            txn.drop(blocks, delete=False)
            txn.drop(meta, delete=False)
        txn.put(b"format", SSD_FORMAT, db=info)


def prefetch(
    txn: lmdb.Transaction, key: bytes, map_start: int | None, page_size: int, capacity: int
) -> bool:
    """Ask the kernel for exactly the pages of ``key``'s value before py-lmdb touches them.

    Reads the overflow page number from the key's leaf node (lmdb's ``MDB_node``: data size,
    flags and key size before the key, the page number right after it). Touches only the
    leaf page (and lmdb the value's first page). Skipped on anything unexpected. False if the
    kernel refused the hint (``errno`` says why).
    """
    assert map_start is not None and madvise is not None
    cursor = txn.cursor()
    if not cursor.set_key(key):
        return True
    found = cursor.key()  # a view of the key inside the leaf node
    address = np.frombuffer(found, dtype=np.uint8).ctypes.data
    lo, hi, flags, ksize = NODE_HEADER.unpack(
        ctypes.string_at(address - NODE_HEADER.size, NODE_HEADER.size)
    )
    if ksize != len(key) or not flags & F_BIGDATA:
        return True  # a small value kept in the leaf, or not the layout we know
    (pgno,) = PAGE_NUMBER.unpack(ctypes.string_at(address + ksize, PAGE_NUMBER.size))
    start = map_start + pgno * page_size
    length = LMDB_PAGE_HEADER + (lo | hi << 16)
    if pgno < 2 or pgno * page_size + length > capacity:
        return True
    return madvise(start, length, MADV_WILLNEED) == 0


def audit_files(
    env: lmdb.Environment, blocks_db: Any, meta_db: Any, now: float, verify_checksums: bool
) -> tuple[AuditReport, list[bytes]]:
    """A merge-join of the ``blocks`` and ``meta`` key orders: what :meth:`SSDTier.audit` finds
    (orphans, unreadable meta, expired blocks, and with ``verify_checksums`` corrupt blocks) and
    the keys to delete. Reads no payload page unless ``verify_checksums``."""
    doomed: list[bytes] = []
    counts = {"blocks": 0, "orphan_meta": 0, "orphan_blocks": 0, "bad_meta": 0}
    counts |= {"expired": 0, "corrupt": 0}
    with env.begin(buffers=True) as txn:
        metas = txn.cursor(db=meta_db)
        blocks = txn.cursor(db=blocks_db)
        has_meta, has_block = metas.first(), blocks.first()
        while has_meta or has_block:
            meta_key = bytes(metas.key()) if has_meta else None
            block_key = bytes(blocks.key()) if has_block else None
            if meta_key is not None and meta_key == block_key:
                meta = decode_meta(metas.value())
                if meta is None or len(meta_key) != BLOCK_KEY_BYTES:
                    counts["bad_meta"] += 1
                    doomed.append(meta_key)
                elif meta.expires_at_s <= now:
                    counts["expired"] += 1
                    doomed.append(meta_key)
                elif verify_checksums and (
                    meta.nbytes != len(value := blocks.value())  # reads the block
                    or not is_block(meta_key, value)
                ):
                    counts["corrupt"] += 1
                    doomed.append(meta_key)
                else:
                    counts["blocks"] += 1
                has_meta, has_block = metas.next(), blocks.next()
            elif meta_key is not None and (block_key is None or meta_key < block_key):
                counts["orphan_meta"] += 1
                doomed.append(meta_key)
                has_meta = metas.next()
            else:
                assert block_key is not None
                counts["orphan_blocks"] += 1
                doomed.append(block_key)
                has_block = blocks.next()
    return AuditReport(**counts), doomed
