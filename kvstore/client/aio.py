"""AsyncKVStoreClient: an asyncio client of one store node, pipelined on one connection.

For callers that live on an event loop (the gateway, asyncio services); the KV connector inside
vLLM's model-runner thread uses the synchronous :class:`kvstore.client.sync.KVStoreClient`. Works on
the default loop and on uvloop.

Data path
    An ``asyncio.BufferedProtocol``, never asyncio streams (which copy every chunk into a new
    ``bytes`` and run 2-4x slower here). Frame headers and small payloads land in one
    preallocated buffer and are parsed in place; a GET's payload is received straight into the
    caller's buffer (``get(keys, outs)``) or into one new buffer per block; a PUT is one
    ``writelines([frame header, block header, caller's buffer])``.

Pipelining
    Every call sends all its frames at once (writes pause while the transport's buffer is above
    its high-water mark) and awaits the replies; calls from several tasks interleave on the one
    connection, since the node answers in request order and each reply is matched to the oldest
    outstanding request. Batch calls split key lists longer than one frame allows.

Methods and results are those of the synchronous client, name for name (``put``/``put_many`` ->
:class:`~kvstore.wire.types.PutStatus`, ``get``/``get_into``/``get_many_into``, ``match_prefix``,
``match_prefix_tiers`` -> :class:`~kvstore.wire.types.NodeMatch`, ``exists``, ``delete``,
``stats``); both read replies through :mod:`kvstore.wire.replies`, so the same reply gives the
same result or error.

Errors (all :class:`~kvstore.errors.KVStoreError`)
    * :class:`~kvstore.errors.KVStoreConnectionLost`: the node closed or reset the connection with
      requests outstanding (they all fail). As in the sync client, a call that finds a connection
      it did not open itself closed (the node's idle timeout, a restart) reconnects and is
      retried once, transparently: every operation is idempotent.
    * :class:`~kvstore.errors.KVStoreTimeout`: a call's replies did not all arrive within
      ``timeout_s``; the connection is dropped (it is out of step), so other calls outstanding on
      it fail with ``KVStoreConnectionLost``.
    * :class:`~kvstore.errors.KVStoreUnavailable`: the node cannot be reached.
    * :class:`~kvstore.errors.KVStoreCorruptError`: a block failed its checksum, named another
      key or disagreed with its frame on the length -- twice: as in the sync client, such a block
      is fetched once more and, if it fails again, deleted from the node before the error is
      raised (``corrupt_reads`` counts them; the connection stays usable). Without keys: a reply
      claimed more than any reply to its request can carry
      (:func:`kvstore.wire.replies.reply_limit`); nothing is allocated and the connection dropped.
    * :class:`~kvstore.errors.KVStoreError`: anything else the node refused, or a caller buffer
      too small for a block (that block's result; the connection stays usable).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

from kvstore.blocks.format import BLOCK_HEADER_BYTES, BlockDType, encode_header
from kvstore.blocks.tier import Tier
from kvstore.client.aio_protocol import PendingRequest, ReplyProtocol
from kvstore.errors import (
    KVStoreAuthError,
    KVStoreConnectionLost,
    KVStoreCorruptError,
    KVStoreError,
    KVStoreTimeout,
    KVStoreUnavailable,
)
from kvstore.wire import replies, requests
from kvstore.wire.frame import (
    DEFAULT_MAX_BLOCK_BYTES,
    Op,
    Status,
)
from kvstore.wire.hello import ClientHello
from kvstore.wire.types import NodeMatch, PutStatus
from strata_common.credentials import ClusterCredentials, CredentialError
from strata_common.endpoints import parse_endpoint
from strata_common.tls import check_peer_role, ssl_peer_identity

logger = logging.getLogger(__name__)

__all__ = ["AsyncKVStoreClient"]

_Buffer = bytes | bytearray | memoryview
_T = TypeVar("_T")


class AsyncKVStoreClient:
    """Asyncio client of one store node at ``endpoint`` (``"host:port"``); connects lazily.

    A block larger than ``max_block_bytes`` (header + data; the node's default limit) is never
    read."""

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 10.0,
        *,
        credentials: ClusterCredentials | None = None,
        max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if max_block_bytes < BLOCK_HEADER_BYTES:
            raise ValueError("max_block_bytes must be at least the 64-byte block header")
        self.max_block_bytes = max_block_bytes
        address = parse_endpoint(endpoint)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._credentials = credentials
        self.corrupt_reads = 0
        """Blocks that failed verification on this client (each refetch and each drop counts)."""
        self._address = (address.host, address.port)
        self._protocol: ReplyProtocol | None = None
        self._connecting = asyncio.Lock()
        self._ids = itertools.count(1)

    # -- public API -------------------------------------------------------------------------------

    async def put(
        self,
        key: bytes,
        data: _Buffer,
        *,
        dtype: BlockDType = BlockDType.RAW,
        shape: Sequence[int] | None = None,
    ) -> PutStatus:
        """Store ``data`` under ``key``: OK, EXISTS (already there; unchanged) or FULL (refused)."""
        requests.check_key(key)
        view = requests.as_bytes_view(data)
        prepared = [(key, encode_header(key, view, dtype, shape), view)]
        return (await self._retrying(lambda: self._put(prepared)))[0]

    async def put_many(self, items: Sequence[tuple[bytes, _Buffer]]) -> list[PutStatus]:
        """Store several blocks, pipelined; returns one status per item, in order.

        The buffers must stay unchanged until the call returns (they are sent without a copy).
        """
        prepared = []
        for key, data in items:
            requests.check_key(key)
            view = requests.as_bytes_view(data)
            prepared.append((key, encode_header(key, view), view))
        return await self._retrying(lambda: self._put(prepared))

    async def get(self, key: bytes) -> bytes | None:
        """Return the block's payload, or None on a miss. Copies once more than :meth:`get_into`."""
        requests.check_key(key)
        (reply,) = await self._get([key], [None])
        return None if reply.body is None else bytes(reply.body)

    async def get_into(self, key: bytes, out: _Buffer) -> int | None:
        """Receive the block's payload into ``out``; returns its length, or None on a miss."""
        requests.check_key(key)
        (reply,) = await self._get([key], [_writable_view(out)])
        return None if reply.body is None else reply.body.nbytes

    async def get_many_into(
        self, keys: Sequence[bytes], outs: Sequence[_Buffer]
    ) -> list[int | None]:
        """:meth:`get_into` for many blocks, pipelined; one result per key, in order.

        A block that fails its checksum, names another key or does not fit its buffer raises
        after every reply of the call has been read (the connection stays usable).
        """
        if len(outs) != len(keys):
            raise ValueError("keys and outs differ in length")
        targets: list[memoryview | None] = []
        for key, out in zip(keys, outs, strict=True):
            requests.check_key(key)
            targets.append(_writable_view(out))
        return [
            None if reply.body is None else reply.body.nbytes
            for reply in await self._get(keys, targets)
        ]

    async def match_prefix(self, keys: Sequence[bytes], *, hint: str | None = None) -> int:
        """Number of leading keys of a prompt's key chain that the node can serve (any tier;
        in a cluster also what live peers hold); ``hint``: the cluster node id that holds the
        blocks (docs/design/kvstore.md §10.9)."""
        return (await self.match_prefix_tiers(keys, hint=hint)).depth

    async def match_prefix_tiers(
        self, keys: Sequence[bytes], *, hint: str | None = None
    ) -> NodeMatch:
        """:meth:`match_prefix` with the tier of each matched block (DRAM or SSD).

        A node without tier information (an older node) reports every block as DRAM.
        """
        requests.check_hint(hint)
        chunks = requests.key_chunks(keys)
        replies_ = await self._keyed_all(Op.MATCH_PREFIX, chunks, hint)
        tiers: list[Tier] = []
        for chunk, reply in zip(chunks, replies_, strict=True):
            assert reply.header is not None
            found = replies.decode_match_tiers(reply.header, _body(reply), len(chunk))
            tiers.extend(found)
            if len(found) < len(chunk):
                break
        return NodeMatch(len(tiers), tuple(tiers))

    async def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is stored (committed) on the node, in any tier."""
        chunks = requests.key_chunks(keys)
        present: list[bool] = []
        for chunk, reply in zip(chunks, await self._keyed_all(Op.EXISTS, chunks), strict=True):
            assert reply.header is not None
            present.extend(replies.decode_exists(reply.header, _body(reply), len(chunk)))
        return present

    async def delete(self, keys: Sequence[bytes]) -> int:
        """Remove blocks; returns how many were present."""
        chunks = requests.key_chunks(keys)
        total = 0
        for chunk, reply in zip(chunks, await self._keyed_all(Op.DELETE, chunks), strict=True):
            assert reply.header is not None
            total += replies.decode_delete(reply.header, len(chunk))
        return total

    async def stats(self) -> dict[str, Any]:
        """The node's counters and occupancy (see kvstore.node.store.NodeStats)."""
        (reply,) = await self._keyed_all(Op.STATS, [[]])
        assert reply.header is not None
        return replies.decode_json(reply.header, _body(reply))

    async def close(self) -> None:
        """Close the connection (outstanding calls fail with KVStoreConnectionLost)."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
            await protocol.closed

    async def __aenter__(self) -> AsyncKVStoreClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- machinery --------------------------------------------------------------------------------

    async def _get(
        self, keys: Sequence[bytes], targets: Sequence[memoryview | None]
    ) -> list[PendingRequest]:
        """GETs with the sync client's rule for a block that fails verification: fetched once
        more, and deleted from the node if it fails again (``KVStoreClient._verified_call``)."""
        try:
            return await self._retrying(lambda: self._get_once(keys, targets))
        except KVStoreCorruptError as exc:
            if not exc.keys:
                raise
            self.corrupt_reads += 1
            logger.warning("%s from %s; fetching it again", exc, self.endpoint)
        try:
            return await self._retrying(lambda: self._get_once(keys, targets))
        except KVStoreCorruptError as exc:
            if exc.keys:
                self.corrupt_reads += 1
                logger.warning("%s again: deleting it from %s", exc, self.endpoint)
                with contextlib.suppress(KVStoreError):
                    await self.delete(exc.keys)
            raise

    async def _get_once(
        self, keys: Sequence[bytes], targets: Sequence[memoryview | None]
    ) -> list[PendingRequest]:
        """GETs, pipelined; each reply's ``body`` is the payload (None for a miss)."""
        protocol = await self._connection()
        pending = []
        for key, target in zip(keys, targets, strict=True):
            request = self._request(protocol, Op.GET, key=key, target=target)
            if protocol.transport is not None and protocol.lost is None:
                protocol.transport.write(requests.get(request.request_id, key))
            pending.append(request)
        done: list[PendingRequest] = await self._await(pending)
        for reply in done:
            assert reply.header is not None
            if reply.header.status == Status.MISS:
                reply.body = None
        return done

    async def _put(self, prepared: Sequence[tuple[bytes, bytes, memoryview]]) -> list[PutStatus]:
        protocol = await self._connection()
        pending = []
        for key, block_header, view in prepared:
            await protocol.wait_writable()
            request = self._request(protocol, Op.PUT, key=key)
            pending.append(request)
            if protocol.transport is None or protocol.lost is not None:
                continue  # the request already failed
            protocol.transport.writelines(requests.put(request.request_id, block_header, view))
        return [replies.put_status(_status(reply)) for reply in await self._await(pending)]

    async def _retrying(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()``; once more on a new connection if the one it found open (opened before
        this call) turns out closed: the sync client's rule (``KVStoreClient._call``)."""
        protocol = self._protocol
        reused = protocol is not None and protocol.lost is None and not protocol.closed.done()
        try:
            return await call()
        except KVStoreConnectionLost as exc:
            if not reused:
                raise
            logger.info("connection to %s broke (%s); reconnecting once", self.endpoint, exc)
        return await call()

    async def _connection(self) -> ReplyProtocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None and not protocol.closed.done():
            return protocol
        async with self._connecting:
            protocol = self._protocol
            if protocol is not None and protocol.lost is None and not protocol.closed.done():
                return protocol
            loop = asyncio.get_running_loop()
            tls = None if self._credentials is None else self._credentials.tls
            try:
                async with asyncio.timeout(self.timeout_s):
                    _, protocol = await loop.create_connection(
                        lambda: ReplyProtocol(self.max_block_bytes),
                        *self._address,
                        ssl=None if tls is None else tls.client_context(),
                        server_hostname=None if tls is None else self._address[0],
                    )
                    if tls is not None:  # the node's certificate must name a store node
                        self._check_node(protocol)
                    if self._credentials is not None:
                        await self._hello(protocol, self._credentials)
            except ssl.SSLError as exc:  # refused certificates, a plaintext node
                raise KVStoreAuthError(f"kvstore node {self.endpoint}: TLS: {exc}") from exc
            except (OSError, TimeoutError) as exc:
                if protocol is not None and protocol.transport is not None:
                    protocol.transport.abort()
                raise KVStoreUnavailable(f"cannot connect to {self.endpoint}: {exc}") from exc
            self._protocol = protocol
            return protocol

    def _check_node(self, protocol: ReplyProtocol) -> None:
        assert protocol.transport is not None
        try:
            check_peer_role(
                ssl_peer_identity(protocol.transport.get_extra_info("ssl_object")), "store"
            )
        except CredentialError as exc:
            error = KVStoreAuthError(f"kvstore node {self.endpoint}: {exc}")
            protocol.abort(error)
            raise error from None

    async def _hello(self, protocol: ReplyProtocol, credentials: ClusterCredentials) -> None:
        """The HELLO handshake (kvstore.wire.hello) on a new connection, before any request."""
        hello = ClientHello(credentials)
        try:
            first = self._request(protocol, Op.HELLO)
            assert protocol.transport is not None
            protocol.transport.write(hello.request(first.request_id))
            reply = cast(PendingRequest, await first.future)
            assert reply.header is not None
            body = b"" if reply.body is None else bytes(reply.body)
            if hello.tls:  # the TLS handshake proved both sides; the node accepted the identity
                hello.accepted(reply.header, body)
                return
            second = self._request(protocol, Op.HELLO_PROOF)
            protocol.transport.write(hello.answer(reply.header, body, second.request_id))
            done = cast(PendingRequest, await second.future)
            assert done.header is not None
            ClientHello.finish(done.header)
        except KVStoreError as exc:
            protocol.abort(exc)
            raise

    def _request(self, protocol: ReplyProtocol, op: Op, **kwargs: Any) -> PendingRequest:
        future = asyncio.get_running_loop().create_future()
        request = PendingRequest(next(self._ids) & 0xFFFFFFFF, future, op, **kwargs)
        if protocol.lost is not None or protocol.transport is None:
            future.set_exception(protocol.lost or KVStoreConnectionLost("connection closed"))
        else:
            protocol.pending.append(request)
        return request

    async def _keyed_all(
        self, op: Op, chunks: Sequence[Sequence[bytes]], hint: str | None = None
    ) -> list[PendingRequest]:
        """One keyed (or empty) request per chunk (a MATCH_PREFIX's with ``hint``), pipelined;
        their replies (retried once on a new connection if the open one turns out closed)."""
        return await self._retrying(lambda: self._await([self._keyed(op, c, hint) for c in chunks]))

    def _keyed(
        self, op: Op, keys: Sequence[bytes], hint: str | None = None
    ) -> asyncio.Future[PendingRequest]:
        """Send one keyed (or empty) request once connected; a future of its reply."""

        async def run() -> PendingRequest:
            protocol = await self._connection()
            request = self._request(protocol, op, asked=len(keys))
            if protocol.transport is not None and protocol.lost is None:
                protocol.transport.writelines(requests.keyed(op, request.request_id, keys, hint))
            return cast(PendingRequest, await request.future)

        return asyncio.ensure_future(run())

    async def _await(
        self, pending: Sequence[PendingRequest | asyncio.Future[PendingRequest]]
    ) -> list[Any]:
        """Wait for every reply of one call, within the timeout; the first error wins."""
        futures = [r.future if isinstance(r, PendingRequest) else r for r in pending]
        gathered = asyncio.gather(*futures, return_exceptions=True)
        try:
            async with asyncio.timeout(self.timeout_s):
                outcomes = await gathered
        except TimeoutError:
            protocol = self._protocol
            error = KVStoreTimeout(
                f"kvstore node {self.endpoint}: no reply within {self.timeout_s:g}s"
            )
            if protocol is not None:
                protocol.abort(KVStoreConnectionLost(f"dropped after a timeout: {error}"))
            for future in futures:
                future.cancel()
            raise error from None
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return list(outcomes)


def _status(reply: PendingRequest) -> int:
    assert reply.header is not None
    return reply.header.status


def _body(reply: PendingRequest) -> bytes:
    if reply.header is not None and reply.header.status != Status.OK:
        raise KVStoreError(f"{reply.op.name} failed (status {reply.header.status})")
    return b"" if reply.body is None else bytes(reply.body)


def _writable_view(buffer: _Buffer) -> memoryview:
    view = requests.as_bytes_view(buffer)
    if view.readonly:
        raise ValueError("outs must be writable")
    return view
