"""One store node's state: ``arena`` (DRAM, /dev/shm), ``store`` (``StoreNode``: index, two-phase
put, leases, eviction), ``ssd`` (the lmdb SSD tier), ``tiers`` (``TierManager``: spill, promotion,
lookups across tiers)."""
