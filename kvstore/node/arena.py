"""The node's one preallocated DRAM arena and its page allocator.

Why one arena, reserved up front
    Faulting in fresh memory runs at ~0.5 GB/s on these machines against ~10 GB/s for copying into
    memory already touched (see /work/shared/notes/machine-limits.md). So the node reserves its
    whole cache at start-up (``posix_fallocate`` on the backing file, then ``MAP_POPULATE``), and
    every block lives in it: no per-block ``malloc``, no first-touch stalls on the data path, and a
    full arena means "evict or refuse", never an OOM kill or a SIGBUS from an over-committed tmpfs.

Why a file in /dev/shm
    The arena is a ``MAP_SHARED`` mapping of a tmpfs file so that a client on the same host can map
    the same pages and copy blocks out at memory speed (the shared-memory transport), and so that
    an operator can see the node's reservation with ``ls -l /dev/shm``. The file is created with
    ``O_EXCL`` and mode 0600 and removed by :meth:`Arena.close`. A node killed with SIGKILL cannot
    remove it, and tmpfs files hold RAM until deleted, so the owner keeps an exclusive ``flock`` on
    its file for its lifetime and :func:`remove_stale_arenas` (run by each node at start-up) deletes
    arena files whose lock nobody holds. A lock, unlike a pid check, is right across pid
    namespaces and immune to pid reuse.

Why pages + best-fit free extents (and not size-class slabs)
    Blocks are one size per (model, layout) -- 256 KiB, 2 MiB, ... -- but a node serves several
    models and layouts over its life and the mix shifts. Slabs strand memory in whichever size class
    was popular first; a page allocator with coalescing gives it back. :class:`PageAllocator` hands
    out runs of contiguous pages (so a block is one contiguous ``memoryview``, sendable with one
    ``write`` and receivable with one ``recv_into``), chooses the *smallest* free run that fits
    (ties to the lowest address), and merges a freed run with its free neighbours immediately.
    Best-fit with immediate coalescing is among the lowest-fragmentation policies known for real
    workloads (Johnstone & Wilson, 1998), and with one dominant block size it degenerates to exact
    reuse of freed holes. Bookkeeping is O(1) dict lookups for coalescing (free runs indexed by
    first and one-past-last page) plus a size-ordered list searched with ``bisect``; the list
    insert/remove is a ``memmove`` of pointers, negligible next to moving a block.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import logging
import mmap
import os
import secrets
import time
from dataclasses import dataclass

from strata_common.closing import Closeable

__all__ = [
    "ARENA_FILE_PREFIX",
    "Arena",
    "ArenaStats",
    "Extent",
    "PageAllocator",
    "remove_stale_arenas",
]

logger = logging.getLogger(__name__)

ARENA_FILE_PREFIX = "strata-kvstore-"
_STALE_MIN_AGE_S = 60.0


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of whole pages in the arena: bytes ``[offset, offset + size)``."""

    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class ArenaStats:
    """Occupancy of an arena, in bytes (allocations are rounded up to whole pages)."""

    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    largest_free_bytes: int
    num_allocations: int
    num_free_extents: int


class PageAllocator:
    """Best-fit allocator of contiguous page runs over ``capacity_bytes`` of address space.

    Owns only offsets, never memory, so it is unit-testable alone. Not thread-safe (its owner, the
    store node, runs on one event-loop thread).
    """

    __slots__ = (
        "_allocated",
        "_by_size",
        "_free_by_end",
        "_free_by_start",
        "_free_pages",
        "_page_size",
        "_total_pages",
    )

    def __init__(self, capacity_bytes: int, page_size: int = 4096) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a positive power of two, got {page_size}")
        if capacity_bytes < page_size or capacity_bytes % page_size:
            raise ValueError("capacity_bytes must be a positive multiple of page_size")
        self._page_size = page_size
        self._total_pages = capacity_bytes // page_size
        # Free runs, in pages: first page -> length, one-past-last page -> first page, and
        # (length, first page) kept sorted for best-fit search.
        self._free_by_start: dict[int, int] = {}
        self._free_by_end: dict[int, int] = {}
        self._by_size: list[tuple[int, int]] = []
        self._allocated: dict[int, int] = {}  # first page -> length, to reject foreign frees
        self._free_pages = 0
        self._insert_free(0, self._total_pages)

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def capacity_bytes(self) -> int:
        return self._total_pages * self._page_size

    def allocate(self, nbytes: int) -> Extent | None:
        """Reserve the smallest free page run holding ``nbytes``; None if no run is big enough."""
        if nbytes <= 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        npages = -(-nbytes // self._page_size)
        i = bisect.bisect_left(self._by_size, (npages, -1))
        if i == len(self._by_size):
            return None
        run_pages, start = self._by_size[i]
        self._remove_free(start, run_pages, size_index=i)
        if run_pages > npages:
            self._insert_free(start + npages, run_pages - npages)
        self._allocated[start] = npages
        return Extent(start * self._page_size, npages * self._page_size)

    def free(self, extent: Extent) -> None:
        """Return ``extent`` (exactly as :meth:`allocate` gave it), merged with free neighbours."""
        start, rem = divmod(extent.offset, self._page_size)
        npages = self._allocated.get(start) if rem == 0 else None
        if npages is None or npages * self._page_size != extent.size:
            raise ValueError(f"{extent} is not an allocated extent of this arena (double free?)")
        del self._allocated[start]
        end = start + npages
        left_start = self._free_by_end.get(start)
        if left_start is not None:
            self._remove_free(left_start, start - left_start)
            start = left_start
        right_pages = self._free_by_start.get(end)
        if right_pages is not None:
            self._remove_free(end, right_pages)
            end += right_pages
        self._insert_free(start, end - start)

    def stats(self) -> ArenaStats:
        largest = self._by_size[-1][0] if self._by_size else 0
        page = self._page_size
        return ArenaStats(
            capacity_bytes=self._total_pages * page,
            used_bytes=(self._total_pages - self._free_pages) * page,
            free_bytes=self._free_pages * page,
            largest_free_bytes=largest * page,
            num_allocations=len(self._allocated),
            num_free_extents=len(self._by_size),
        )

    def check_invariants(self) -> None:
        """Audit the bookkeeping (for tests and ``--debug``); raises AssertionError if broken.

        Checks that allocated and free runs tile the address space exactly, with no overlap, no two
        adjacent free runs (coalescing is complete), and the three free-run indexes agreeing.
        """
        runs = sorted(
            [(s, n, "free") for s, n in self._free_by_start.items()]
            + [(s, n, "used") for s, n in self._allocated.items()]
        )
        cursor = 0
        previous_kind = ""
        for start, npages, kind in runs:
            if start != cursor or npages <= 0:
                raise AssertionError(f"gap or overlap at page {start} (expected {cursor})")
            if kind == "free" and previous_kind == "free":
                raise AssertionError(f"adjacent free runs not coalesced at page {start}")
            cursor, previous_kind = start + npages, kind
        if cursor != self._total_pages:
            raise AssertionError(f"runs cover {cursor} of {self._total_pages} pages")
        if sorted((n, s) for s, n in self._free_by_start.items()) != self._by_size:
            raise AssertionError("size index disagrees with free runs")
        if {s + n: s for s, n in self._free_by_start.items()} != self._free_by_end:
            raise AssertionError("end index disagrees with free runs")
        if sum(self._free_by_start.values()) != self._free_pages:
            raise AssertionError("free page count is wrong")

    def _insert_free(self, start: int, npages: int) -> None:
        self._free_by_start[start] = npages
        self._free_by_end[start + npages] = start
        bisect.insort(self._by_size, (npages, start))
        self._free_pages += npages

    def _remove_free(self, start: int, npages: int, size_index: int | None = None) -> None:
        del self._free_by_start[start]
        del self._free_by_end[start + npages]
        if size_index is None:
            size_index = bisect.bisect_left(self._by_size, (npages, start))
        del self._by_size[size_index]
        self._free_pages -= npages


class Arena(Closeable):
    """One node's block memory: a prefaulted shared mapping of a /dev/shm file plus its allocator.

    Callers allocate an :class:`Extent`, fill or read it through :meth:`view`, and free it. The
    arena never interprets the bytes.
    """

    def __init__(
        self,
        size_bytes: int,
        page_size: int = 4096,
        directory: str = "/dev/shm",
        name: str | None = None,
        prefault: bool = True,
    ) -> None:
        self._allocator = PageAllocator(size_bytes, page_size)
        file_name = name or f"{ARENA_FILE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path = os.path.join(directory, file_name)
        self.size = size_bytes
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "alive" marker for the stale sweep
            os.ftruncate(fd, size_bytes)
            if prefault:
                # Reserve the tmpfs pages now: ENOSPC here beats SIGBUS on first write later.
                os.posix_fallocate(fd, 0, size_bytes)
            flags = mmap.MAP_SHARED
            if prefault:
                flags |= getattr(mmap, "MAP_POPULATE", 0)
            self._mmap = mmap.mmap(fd, size_bytes, flags=flags)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        self._fd = fd
        self._view = memoryview(self._mmap)
        self._address: int | None = None
        self._closed = False
        stat = os.fstat(fd)
        self.device, self.inode = stat.st_dev, stat.st_ino

    @property
    def page_size(self) -> int:
        return self._allocator.page_size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def address(self) -> int:
        """Virtual address of the mapping in this process (to register it for RDMA)."""
        if self._address is None:
            anchor = ctypes.c_char.from_buffer(self._mmap)
            try:
                self._address = ctypes.addressof(anchor)
            finally:
                del anchor  # drop the buffer export so that close() can unmap
        return self._address

    def allocate(self, nbytes: int) -> Extent | None:
        """Reserve space for ``nbytes``; None when no contiguous run is free (caller evicts)."""
        return self._allocator.allocate(nbytes)

    def free(self, extent: Extent) -> None:
        """Give ``extent`` back. Its bytes are not cleared."""
        self._allocator.free(extent)

    def view(self, extent: Extent, nbytes: int | None = None) -> memoryview:
        """A writable view of the first ``nbytes`` (default: all) of ``extent``; no copy."""
        length = extent.size if nbytes is None else nbytes
        if not 0 <= length <= extent.size:
            raise ValueError(f"nbytes {length} outside extent of {extent.size} bytes")
        return self._view[extent.offset : extent.offset + length]

    def offset_of(self, view: memoryview) -> int:
        """Offset in the arena of a writable view obtained from :meth:`view` (e.g. a pending
        put's), for clients that write the block themselves through shared memory or RDMA."""
        anchor = ctypes.c_char.from_buffer(view)
        try:
            offset = ctypes.addressof(anchor) - self.address
        finally:
            del anchor
        if not 0 <= offset <= self.size - view.nbytes:
            raise ValueError("view is not inside this arena")
        return offset

    def stats(self) -> ArenaStats:
        return self._allocator.stats()

    def check_invariants(self) -> None:
        self._allocator.check_invariants()

    def close(self) -> None:
        """Unmap and delete the backing file. Idempotent.

        Views still held elsewhere keep their pages alive until they are released (the kernel
        frees tmpfs pages once the file is unlinked and the last mapping goes), so closing with
        views outstanding is safe; it is logged because it hints at a leaked lease.
        """
        if self._closed:
            return
        self._closed = True
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            logger.warning("arena file %s was already removed", self.path)
        try:
            self._view.release()
            self._mmap.close()
        except BufferError:
            logger.info("arena closed with views outstanding; unmapped when they are released")
        os.close(self._fd)


def remove_stale_arenas(directory: str, min_age_s: float = _STALE_MIN_AGE_S) -> list[str]:
    """Delete arena files in ``directory`` left by nodes that died; returns the removed paths.

    Only automatically named files (``strata-kvstore-<pid>-<hex>``) are considered, and one is
    stale only if no process holds its ``flock`` (every live :class:`Arena` does) and it is older
    than ``min_age_s`` (a node between creating and locking its file). The pid in the name is not
    consulted: in containers sharing the host's ``/dev/shm`` (Kubernetes: deploy/), a dead
    node's pid is, more often than not, a live process of another pid namespace — this node's
    own, even — and only the lock is right across namespaces.
    """
    removed = []
    now = time.time()
    for entry in os.scandir(directory):
        if _owner_pid(entry.name) is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # locked: its node is alive
        else:
            os.unlink(entry.path)
            removed.append(entry.path)
        finally:
            os.close(fd)
    return removed


def _owner_pid(file_name: str) -> int | None:
    if not file_name.startswith(ARENA_FILE_PREFIX):
        return None
    pid, sep, _token = file_name[len(ARENA_FILE_PREFIX) :].partition("-")
    return int(pid) if sep and pid.isdigit() else None
