"""Data paths between a client and a store node: ``base`` (interface, selection), ``shm``,
``rdma``, ``tcp`` (see :mod:`kvstore.transport.base`)."""
