"""Cluster metadata: members, heartbeats, resync requests, the atomic reap and the KV event stream.

Module map (lower rows import only rows above them; nothing here imports a row below it):

| module | owns |
|---|---|
| `base.py` | the `MetadataStore` protocol, `MemberKind`, constants, errors, `parse_metadata_spec` |
| `embedded.py` | `EmbeddedMetadataStore` (in this process) |
| `redis.py` | `RedisMetadataStore` (Redis/Valkey; redis-py imported on first use) |
| `messages.py` | member info <-> protobuf (`strata_proto.metadata_pb2`) |
| `service.py` | `MetadataServer`: the gRPC service over an embedded store, and health |
| `remote.py` | `RemoteMetadataStore`: the gRPC client (`strata://HOST:PORT`) |

This package's ``__init__`` imports only the rows that need neither grpc nor protobuf, so that
``import kvstore.metadata`` (and everything that follows the stream: ``kvstore.cluster``,
``kvstore.cluster.membership``, the gateway, the workers) stays light; :func:`open_metadata_store`
imports :mod:`kvstore.metadata.remote` only for a ``strata://`` spec.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from kvstore.metadata.base import (
    DEFAULT_PREFIX,
    KIND_KEY,
    START,
    STRATA_SCHEME,
    MemberKind,
    MetadataServiceError,
    MetadataSpec,
    MetadataStore,
    OutageLog,
    member_kind,
    parse_metadata_spec,
)
from kvstore.metadata.embedded import EmbeddedMetadataStore
from kvstore.metadata.redis import RedisMetadataStore

if TYPE_CHECKING:
    from strata_common.grpc_auth import ClientAuth

__all__ = [
    "DEFAULT_PREFIX",
    "KIND_KEY",
    "START",
    "STRATA_SCHEME",
    "EmbeddedMetadataStore",
    "MemberKind",
    "MetadataServiceError",
    "MetadataSpec",
    "MetadataStore",
    "OutageLog",
    "RedisMetadataStore",
    "member_kind",
    "open_metadata_store",
    "parse_metadata_spec",
]

_EMBEDDED: dict[str, EmbeddedMetadataStore] = {}
_EMBEDDED_LOCK = threading.Lock()


def open_metadata_store(spec: str, *, auth: ClientAuth | None = None) -> MetadataStore:
    """``"embedded"`` (this process's shared embedded store), a ``redis://`` URL, or
    ``strata://HOST:PORT``: the embedded store of a store node, through its gRPC metadata service
    at HOST:PORT (:mod:`kvstore.metadata.remote`) -- one host, no Redis. A malformed spec raises
    the ValueError of :func:`parse_metadata_spec`.

    ``auth``: this process's cluster credentials, sent with every call to a ``strata://``
    service (docs/design/security.md §5.1); with Redis (its own ACL and password) its cluster
    key seals every record written and checks every record read (§5.2)."""
    parsed = parse_metadata_spec(spec)
    if parsed.scheme == "embedded":
        with _EMBEDDED_LOCK:
            return _EMBEDDED.setdefault(spec, EmbeddedMetadataStore())
    if parsed.scheme == "strata":
        from kvstore.metadata.remote import RemoteMetadataStore  # grpc: only for strata://

        return RemoteMetadataStore(parsed.endpoint, auth=auth)
    return RedisMetadataStore(spec, cluster_key=None if auth is None else auth.cluster_key)
