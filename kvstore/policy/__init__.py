"""Eviction and admission policies of a store node, one per module (docs/design/kvstore.md §6).

``base`` is the interface, ``factory`` builds one from a ``PolicyKind``; ``lru``, ``s3fifo``,
``arc``, ``sieve`` are the policies; ``sketch``, ``admission`` and ``admitted`` put a policy
behind an admission filter (W-TinyLFU, second-hit LRU).
"""
