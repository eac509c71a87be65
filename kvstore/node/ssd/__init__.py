"""SSDTier: a store node's SSD tier on lmdb -- crash-safe, restartable, bounded, TTL, verified.

The design of record is docs/design/kvstore.md §7; the reasons, in short:

Why lmdb
    A copy-on-write B-tree in one memory-mapped file: commits are atomic (a crash leaves the last
    committed state, never a torn block), reads are a pointer into the page cache (``get`` with
    ``buffers=True``: no copy until we copy into the destination), values of any size are stored
    contiguously (overflow pages), and it releases the GIL in every call. Measured here it puts at
    3-4 GB/s into the page cache and reads warm values at 14-22 GB/s.

Layout
    Three named databases in one environment: ``blocks`` (key -> the block exactly as it sits in
    DRAM, 64-byte header + payload), ``meta`` (key -> ``<QQdd``: block length, write sequence
    number, stored-at and expires-at wall-clock seconds) and ``info`` (format version). A block and
    its meta are written and deleted in the **same transaction**, so they always agree after a
    crash; :meth:`SSDTier.audit` (run at open) checks and repairs that anyway with a merge-join of
    the two key orders, which reads no payload pages.

Index in memory
    Lookups (EXISTS, MATCH_PREFIX, the GET decision) run on the event loop, so they must not touch
    the disk: a dict key -> :class:`Meta`, kept in write order (= expiry order, so the TTL sweep
    is O(expired)), plus an injected :class:`~kvstore.policy.base.EvictionPolicy` for capacity. Both
    are rebuilt from ``meta`` at open. Recency is not persisted (a read never costs a write).

Threads
    Every method is thread-safe: one lock guards the index, the policy and the counters and is
    never held across disk I/O. Reads may run on several threads at once. Writes (:meth:`put_many`,
    :meth:`purge_pending`, :meth:`sweep_expired`) must be issued from one thread at a time, in
    order -- lmdb has one writer anyway, and the tier manager's single writer thread gives FIFO
    order, which is what makes "unindex now, purge later" (DELETE, corrupt blocks) correct: a key
    removed from the index is *tombstoned*, a write batch that was already queued does not
    re-index it, and the purge queued behind that batch deletes it from the file.

Cold reads without read amplification
    py-lmdb touches every page of a value it returns (so that page faults happen without the
    GIL), and lmdb touches a value's first page on every lookup. With lmdb's default
    ``readahead=True`` each such fault makes the kernel read ``read_ahead_kb`` around it -- 8 MiB
    on these VMs: a random cold 256 KiB read pulled 12.6x its size from disk, and every eviction or
    audit step read megabytes. So the map is opened with ``readahead=False`` (``MADV_RANDOM``:
    faults read exactly one page), and :meth:`SSDTier.read_into` first locates the value without
    touching it (``cursor.set_key``; the overflow page number follows the key in lmdb's leaf node)
    and asks the kernel for exactly its pages (``madvise(MADV_WILLNEED)``), so the preload finds
    them cached or in flight: one exact I/O per block. If anything about that hint looks wrong the
    hint is skipped -- it is an optimisation, verification does not depend on it.

Checksums
    :meth:`SSDTier.read_into` copies the stored block into the destination (``np.copyto``, which
    releases the GIL, so cold page faults do not stall the event loop) and then checks header,
    key, length and the payload's xxh3_64 *on the destination*. Anything wrong: the read is a
    miss, the block leaves the index at once, is purged, and counted (``corrupt_dropped``).

Modules: ``tier`` (:class:`~kvstore.node.ssd.tier.SSDTier`), ``types`` (reads, stats, errors),
``files`` (the lmdb environment, meta records, block checks, kernel hints).
"""
