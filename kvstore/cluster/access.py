"""Who may call which RPC of a store node's metadata service (docs/design/security.md §5.1).

:func:`metadata_policy` is the service's authorisation policy in secret mode
(:class:`strata_common.grpc_auth.ServerAuthInterceptor` calls it after authenticating the caller,
before any handler). Identities: ``store/NODE_ID`` (a store node: its ``--node-id``, default its
``HOST:PORT``), ``worker/INSTANCE_ID`` (a worker publishing its HBM events: its ``--instance-id``,
default its gRPC ``HOST:PORT`` -- the source id of its events), ``gateway/NAME`` (the gateway's
prefix index).

| RPC | ``store/N`` | ``worker/W`` | ``gateway`` |
|---|---|---|---|
| Register | as N, kind ``store`` | as W, kind ``engine`` | no |
| Heartbeat, Deregister, TakeResync | as N | as W | no |
| Publish | messages of source N only | messages of source W only | no |
| Members, Alive, Read, RequestResync | yes | no | yes |
| Reap | yes, appending nothing but the reaped member's goodbye (*) | no | yes (*) |

(*) no message, or exactly ``SourceCleared(node_id, SOURCE_GONE_SEQ)`` of the reaped member.

Why: a member speaks only for itself (no fake members, no events under another's id, a store
node cannot pose as an engine or the reverse); the stream names every stored key, so a worker
(data plane) does not read it, while store nodes (read-through needs the holders) and gateways
(routing) do; a reap is conditional on the member being dead (the store checks its heartbeat and
its exact registration), so any follower may do it, but it can append nothing but the dead
member's own goodbye. The ``admin`` role has no business here.

Every message of a Publish is decoded in full (:func:`~kvstore.cluster.events.message_source`):
a malformed one is refused too, where before readers dropped it.
"""

from __future__ import annotations

from typing import Any, Final

from kvstore.cluster.events import SOURCE_GONE_SEQ, SourceCleared, encode_event, message_source
from kvstore.metadata import KIND_KEY, MemberKind
from kvstore.metadata.messages import info_from_proto
from kvstore.metadata.service import METADATA_SERVICE_NAME
from strata_common.credentials import Identity

__all__ = ["metadata_policy"]

_MEMBER_KIND: Final = {"store": MemberKind.STORE, "worker": MemberKind.ENGINE}
_OWN_ID_RPCS: Final = frozenset({"Register", "Heartbeat", "Deregister", "TakeResync", "Publish"})
_FOLLOWER_RPCS: Final = frozenset({"Members", "Alive", "Read", "RequestResync", "Reap"})
_FOLLOWERS: Final = frozenset({"store", "gateway"})


def metadata_policy(identity: Identity, method: str, request: Any) -> str | None:
    """None if ``identity`` may make this call, else why not (see the module docstring)."""
    service, _, rpc = method.strip("/").partition("/")
    if service != METADATA_SERVICE_NAME:
        return "not a metadata RPC"
    if rpc in _OWN_ID_RPCS:
        kind = _MEMBER_KIND.get(identity.role)
        if kind is None:
            return "only a member (role store or worker) may call it"
        return _own(identity.name, kind, rpc, request)
    if rpc in _FOLLOWER_RPCS:
        if identity.role not in _FOLLOWERS:
            return "only roles gateway and store follow the cluster"
        return _reap_messages(request) if rpc == "Reap" else None
    return "unknown RPC"


def _own(member: str, kind: MemberKind, rpc: str, request: Any) -> str | None:
    if rpc == "Publish":
        for message in request.messages:
            try:
                source = message_source(message)
            except ValueError as exc:
                return f"malformed stream message: {exc}"
            if source != member:
                return f"a message of source {source!r:.80} (a member publishes as itself only)"
        return None
    if request.node_id != member:
        return f"node_id {request.node_id!r:.80} (a member acts as itself only)"
    if rpc == "Register":
        registered = info_from_proto(request.info).get(KIND_KEY, MemberKind.STORE.value)
        if registered != kind.value:
            return f"kind {str(registered)!r:.40} (this member registers as kind {kind.value!r})"
    return None


def _reap_messages(request: Any) -> str | None:
    messages = list(request.messages)
    if not messages:
        return None
    try:
        goodbye = encode_event(SourceCleared(request.node_id, SOURCE_GONE_SEQ))
    except ValueError:
        goodbye = None
    if messages == [goodbye]:
        return None
    return "a reap appends nothing but the reaped member's SourceCleared(GONE)"
