"""``strata://HOST:PORT``: a store node's embedded metadata, through its gRPC service.

:class:`RemoteMetadataStore` implements the whole :class:`~kvstore.metadata.base.MetadataStore`
protocol with the typed stub of ``strata.metadata.v1.Metadata`` (served by
:mod:`kvstore.metadata.service`; docs/design/kvstore.md §10.6).

- **Deadlines.** Every call has one: ``timeout_s`` (10 s by default), and for ``read`` its
  ``block_s`` on top (the service answers an empty batch at ``block_s``).
- **Errors**, as the other backends raise them: a node that cannot be reached is
  ``ConnectionError`` (UNAVAILABLE), one that does not answer within the deadline ``TimeoutError``
  (DEADLINE_EXCEEDED), an argument the service refuses ``ValueError`` (INVALID_ARGUMENT), any
  other status :class:`~kvstore.metadata.base.MetadataServiceError`. The callers (NodeAgent's
  threads, ClusterView, the HBM event publisher) log and retry.
- **Credentials.** With ``auth`` (a :class:`strata_common.grpc_auth.ClientAuth`: the cluster key
  and this process's identity) every call carries them (docs/design/security.md §5.1); a refused
  call (UNAUTHENTICATED, PERMISSION_DENIED) is a
  :class:`~kvstore.metadata.base.MetadataServiceError` naming the reason.
- **One channel, any thread.** A gRPC channel multiplexes calls, so a long-polling ``read`` never
  delays another thread's heartbeat. A node that restarted is reconnected to by the channel on the
  next call (reconnect back-off at most 1 s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar

import grpc

from kvstore.metadata.base import MAX_BLOCK_S, MAX_MESSAGE_BYTES, MetadataServiceError
from kvstore.metadata.messages import info_from_proto, info_to_proto
from strata_common.endpoints import parse_endpoint
from strata_common.grpc_auth import ClientAuth, blocking_channel
from strata_proto import metadata_pb2, metadata_pb2_grpc

__all__ = ["DEFAULT_TIMEOUT_S", "RemoteMetadataStore"]

DEFAULT_TIMEOUT_S: Final = 10.0
_CHANNEL_OPTIONS: Final = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES + (1 << 20)),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES + (1 << 20)),
    # Not min_reconnect_backoff_ms: gRPC also takes it as the connect timeout (20 s by default,
    # bounded by each call's deadline anyway), and a loaded host must not fail handshakes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)
_ERRORS: Final[dict[Any, type[Exception]]] = {
    grpc.StatusCode.UNAVAILABLE: ConnectionError,
    grpc.StatusCode.DEADLINE_EXCEEDED: TimeoutError,
    grpc.StatusCode.INVALID_ARGUMENT: ValueError,
}

Reply = TypeVar("Reply")


class RemoteMetadataStore:
    """:class:`~kvstore.metadata.base.MetadataStore` served by a store node's gRPC metadata
    service at ``endpoint`` (``HOST:PORT``, IPv6 in brackets); thread-safe."""

    def __init__(
        self, endpoint: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, auth: ClientAuth | None = None
    ) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        self.endpoint = str(parse_endpoint(endpoint))
        self.timeout_s = timeout_s
        self._channel, channel = blocking_channel(self.endpoint, auth, _CHANNEL_OPTIONS)
        self._stub = metadata_pb2_grpc.MetadataStub(channel)  # type: ignore[no-untyped-call]

    # -- MetadataStore ----------------------------------------------------------------------

    def register(self, node_id: str, info: Mapping[str, Any]) -> None:
        request = metadata_pb2.RegisterRequest(node_id=node_id, info=info_to_proto(info))
        self._call("Register", self._stub.Register, request)

    def deregister(self, node_id: str) -> None:
        self._call(
            "Deregister", self._stub.Deregister, metadata_pb2.DeregisterRequest(node_id=node_id)
        )

    def heartbeat(self, node_id: str, ttl_s: float) -> bool:
        request = metadata_pb2.HeartbeatRequest(node_id=node_id, ttl_s=ttl_s)
        reply: metadata_pb2.HeartbeatResponse = self._call(
            "Heartbeat", self._stub.Heartbeat, request
        )
        return reply.registered

    def members(self) -> dict[str, dict[str, Any]]:
        reply: metadata_pb2.MembersResponse = self._call(
            "Members", self._stub.Members, metadata_pb2.MembersRequest()
        )
        return {node_id: info_from_proto(info) for node_id, info in reply.members.items()}

    def alive(self, node_ids: Iterable[str]) -> set[str]:
        nodes = list(node_ids)
        if not nodes:
            return set()
        reply: metadata_pb2.AliveResponse = self._call(
            "Alive", self._stub.Alive, metadata_pb2.AliveRequest(node_ids=nodes)
        )
        return set(reply.node_ids)

    def request_resync(self, node_id: str) -> None:
        request = metadata_pb2.RequestResyncRequest(node_id=node_id)
        self._call("RequestResync", self._stub.RequestResync, request)

    def take_resync_request(self, node_id: str) -> bool:
        request = metadata_pb2.TakeResyncRequest(node_id=node_id)
        reply: metadata_pb2.TakeResyncResponse = self._call(
            "TakeResync", self._stub.TakeResync, request
        )
        return reply.taken

    def reap(self, node_id: str, info: Mapping[str, Any], messages: Sequence[bytes]) -> bool:
        request = metadata_pb2.ReapRequest(
            node_id=node_id, info=info_to_proto(info), messages=[bytes(m) for m in messages]
        )
        reply: metadata_pb2.ReapResponse = self._call("Reap", self._stub.Reap, request)
        return reply.reaped

    def publish(self, messages: Sequence[bytes]) -> None:
        if messages:
            request = metadata_pb2.PublishRequest(messages=[bytes(m) for m in messages])
            self._call("Publish", self._stub.Publish, request)

    def read(self, cursor: str, block_s: float, count: int = 1024) -> tuple[str, list[bytes]]:
        block_s = min(max(block_s, 0.0), MAX_BLOCK_S)
        request = metadata_pb2.ReadRequest(cursor=cursor, block_s=block_s, count=count)
        reply: metadata_pb2.ReadResponse = self._call(
            "Read", self._stub.Read, request, self.timeout_s + block_s
        )
        return reply.cursor, list(reply.messages)

    def close(self) -> None:
        self._channel.close()

    # -- call machinery -------------------------------------------------------------------------

    def _call(
        self,
        rpc: str,
        method: Callable[..., Reply],
        request: Any,
        timeout_s: float | None = None,
    ) -> Reply:
        """One call with its deadline; a failed call raises the mapped exception."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
            error = _ERRORS.get(code, MetadataServiceError)
            where = f"metadata at {self.endpoint}: {rpc}"
            raise error(f"{where}: {details or code.name} ({code.name})") from None
