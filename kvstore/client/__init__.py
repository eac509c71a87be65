"""Clients of one store node: ``sync`` (``KVStoreClient``, thread-safe, shm/RDMA/TCP) and ``aio``
(``AsyncKVStoreClient``, asyncio), with the same methods, results and errors."""
