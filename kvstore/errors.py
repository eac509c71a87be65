"""Errors every kvstore client raises (:mod:`kvstore.client.sync`, :mod:`kvstore.client.aio`).

The store is a cache: callers typically treat any :class:`KVStoreError` as a miss and recompute.
The subclasses say why, for logs and metrics.
"""

from __future__ import annotations

__all__ = [
    "KVStoreAuthError",
    "KVStoreConnectionLost",
    "KVStoreCorruptError",
    "KVStoreError",
    "KVStoreTimeout",
    "KVStoreUnavailable",
]


class KVStoreError(Exception):
    """Base of every error the clients raise."""


class KVStoreUnavailable(KVStoreError):
    """The node cannot be reached or stopped answering; treat as a miss and recompute."""


class KVStoreConnectionLost(KVStoreUnavailable):
    """The connection closed or broke with requests outstanding."""


class KVStoreTimeout(KVStoreUnavailable):
    """No reply within the client's timeout; the connection was dropped (it is out of step)."""


class KVStoreCorruptError(KVStoreError):
    """A block read from the node failed its checksum or is not the block asked for, or a reply's
    body contradicts its frame (a length mismatch, a bitmap or batch reply of the wrong size).
    Which reply raises which error is decided in one place, :mod:`kvstore.wire.replies`.

    ``keys`` names the blocks that failed verification (empty for a garbled reply that names no
    block): the clients refetch such a block once and, if it fails again, delete it from the node
    so that a damaged stored copy is not served to every later reader."""

    def __init__(self, message: str, keys: tuple[bytes, ...] = ()) -> None:
        super().__init__(message)
        self.keys = keys


class KVStoreAuthError(KVStoreError):
    """The node refused this client's credentials or needs some (it was started with a cluster
    key: give the client the same key), the client refused the node's (it does not hold the
    cluster key: not a node of this cluster), or the client's role may not use the op."""
