"""AsyncKVStoreClient: an asyncio client of one store node, pipelined on one connection.

For callers that live on an event loop (the gateway, asyncio services); the KV connector inside
vLLM's model-runner thread uses the synchronous :class:`kvstore.client.KVStoreClient`. Works on
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

Results are frozen dataclasses: :class:`MatchResult` (per-tier prefix depths), :class:`GetResult`,
:class:`PutResult`; ``exists`` returns one bool per key and ``delete`` a count.

Errors (all :class:`~kvstore.errors.KVStoreError`)
    * :class:`~kvstore.errors.KVStoreConnectionLost`: the node closed or reset the connection with
      requests outstanding (they all fail); the next call reconnects.
    * :class:`~kvstore.errors.KVStoreTimeout`: a call's replies did not all arrive within
      ``timeout_s``; the connection is dropped (it is out of step), so other calls outstanding on
      it fail with ``KVStoreConnectionLost``.
    * :class:`~kvstore.errors.KVStoreUnavailable`: the node cannot be reached.
    * :class:`~kvstore.errors.KVStoreCorruptError`: a block failed its checksum or named another
      key (the connection stays usable).
    * :class:`~kvstore.errors.KVStoreError`: anything else the node refused, or a caller buffer
      too small for a block (that block's result; the connection stays usable).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

from kvstore.block import BLOCK_HEADER_BYTES, BlockFormatError, BlockHeader, encode_header, verify
from kvstore.errors import (
    KVStoreConnectionLost,
    KVStoreCorruptError,
    KVStoreError,
    KVStoreTimeout,
    KVStoreUnavailable,
)
from kvstore.events import Tier
from kvstore.node import PutStatus
from kvstore.protocol import (
    FRAME_HEADER_BYTES,
    KEY_BYTES,
    MAX_KEYS_PER_FRAME,
    FrameError,
    FrameHeader,
    Op,
    Status,
    decode_bitmap,
    pack_frame_header,
)

__all__ = [
    "AsyncKVStoreClient",
    "GetResult",
    "MatchResult",
    "PutResult",
]

_RECV_BUFFER_BYTES = 256 * 1024
_WRITE_HIGH_WATER = 4 * 1024 * 1024
_Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class MatchResult:
    """How much of one key chain the node holds.

    ``depth_by_tier[t]`` (index with :class:`Tier`) counts the leading keys held in tier ``t``
    or a faster one, as :class:`kvstore.index.PrefixMatch` does: a store node has no HBM, so
    ``depth_by_tier[HBM] == 0 <= depth_by_tier[DRAM] <= depth_by_tier[SSD] == depth``.
    """

    depth: int
    depth_by_tier: tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class GetResult:
    """One block of a GET: ``nbytes`` is None on a miss; ``data`` is set only when no caller
    buffer was given; ``tier`` is where the node found it (DRAM or SSD)."""

    key: bytes
    nbytes: int | None
    tier: Tier | None = None
    data: bytes | None = None

    @property
    def hit(self) -> bool:
        return self.nbytes is not None


@dataclass(frozen=True, slots=True)
class PutResult:
    key: bytes
    status: PutStatus


@dataclass(slots=True)
class _Request:
    """An outstanding request: how to receive its reply and where to deliver it."""

    request_id: int
    future: asyncio.Future[Any]
    op: Op
    key: bytes = b""
    target: memoryview | None = None  # GET into a caller buffer
    header: FrameHeader | None = None
    block: BlockHeader | None = None
    body: memoryview | None = None
    error: KVStoreError | None = field(default=None)


class _Protocol(asyncio.BufferedProtocol):
    """Frame parser of one connection; replies are matched to requests in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[_Request] = deque()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: KVStoreError | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._buf = bytearray(_RECV_BUFFER_BYTES)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._sink: memoryview | None = None  # rest of a payload goes straight here
        self._sink_pos = 0
        self._skip = 0  # payload bytes to drop (a block that did not fit)

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self.fail(self.lost or KVStoreConnectionLost(f"connection to the node closed{reason}"))
        self._can_write.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._sink is not None:
            return self._sink[self._sink_pos :]
        if self._skip:
            return self._view[: min(self._skip, _RECV_BUFFER_BYTES)]
        if self._end == _RECV_BUFFER_BYTES:
            remaining = self._end - self._start
            self._buf[:remaining] = self._view[self._start : self._end]
            self._start, self._end = 0, remaining
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._sink is not None:
                self._sink_pos += nbytes
                if self._sink_pos == self._sink.nbytes:
                    self._sink = None
                    self._complete(self.pending.popleft())
                    self._parse()
            elif self._skip:
                self._skip -= nbytes
                if not self._skip:
                    self._complete(self.pending.popleft())
                    self._parse()
            else:
                self._end += nbytes
                self._parse()
        except (FrameError, KVStoreError) as exc:
            self.abort(KVStoreError(f"garbled reply from the node: {exc}"))

    def eof_received(self) -> bool:
        return False

    # -- control --------------------------------------------------------------------------------

    async def wait_writable(self) -> None:
        await self._can_write.wait()

    def fail(self, error: KVStoreError) -> None:
        while self.pending:
            future = self.pending.popleft().future
            if not future.done():
                future.set_exception(error)

    def abort(self, error: KVStoreError) -> None:
        """Drop the connection; every outstanding request fails with ``error``."""
        if self.lost is None:
            self.lost = error
        self.fail(error)
        if self.transport is not None:
            self.transport.abort()

    # -- parsing --------------------------------------------------------------------------------

    def _parse(self) -> None:
        while self._sink is None and not self._skip:
            avail = self._end - self._start
            if avail < FRAME_HEADER_BYTES:
                break
            if not self.pending:
                raise KVStoreError("reply without a request")
            request = self.pending[0]
            header = FrameHeader.decode(self._view, self._start)
            if header.request_id != request.request_id or header.opcode is not request.op:
                raise KVStoreError(
                    f"reply {header.opcode.name}/{header.request_id} for request "
                    f"{request.op.name}/{request.request_id}"
                )
            body = self._start + FRAME_HEADER_BYTES
            length = header.payload_len
            request.header = header
            if request.op is Op.GET and header.status == Status.OK:
                # The block header first (small: wait for it in the buffer), then the payload.
                if length < BLOCK_HEADER_BYTES:
                    raise KVStoreError("GET reply shorter than a block header")
                if avail < FRAME_HEADER_BYTES + BLOCK_HEADER_BYTES:
                    break
                self._start = body + BLOCK_HEADER_BYTES
                self._begin_block(request, length - BLOCK_HEADER_BYTES, body)
            else:
                self._start = body
                request.body = memoryview(bytearray(length))
                self._receive_into(request, request.body)

    def _begin_block(self, request: _Request, nbytes: int, header_at: int) -> None:
        try:
            block = BlockHeader.decode(self._view[header_at : header_at + BLOCK_HEADER_BYTES])
        except BlockFormatError as exc:
            request.error = KVStoreCorruptError(f"bad block header from the node: {exc}")
            self._receive_into(request, None, nbytes)
            return
        if block.payload_nbytes != nbytes:
            raise KVStoreError("block header and frame disagree on the length")
        request.block = block
        if block.key != request.key:
            request.error = KVStoreCorruptError(
                f"asked for {request.key.hex()}, got {block.key.hex()}"
            )
            self._receive_into(request, None, nbytes)
            return
        target = request.target
        if target is None:
            request.body = memoryview(bytearray(nbytes))
            self._receive_into(request, request.body)
        elif nbytes > target.nbytes:
            request.error = KVStoreError(
                f"block of {nbytes} bytes does not fit in {target.nbytes} bytes"
            )
            self._receive_into(request, None, nbytes)
        else:
            request.body = target[:nbytes]
            self._receive_into(request, request.body)

    def _receive_into(self, request: _Request, sink: memoryview | None, nbytes: int = 0) -> None:
        """Deliver the next payload bytes into ``sink`` (or drop ``nbytes`` if it is None)."""
        length = sink.nbytes if sink is not None else nbytes
        have = min(self._end - self._start, length)
        if sink is not None:
            sink[:have] = self._view[self._start : self._start + have]
        self._start += have
        if self._start == self._end:
            self._start = self._end = 0
        if have == length:
            self._complete(self.pending.popleft())
        elif sink is not None:
            self._sink, self._sink_pos = sink, have
        else:
            self._skip = length - have

    def _complete(self, request: _Request) -> None:
        future = request.future
        if future.done():  # cancelled by its caller; the reply is consumed all the same
            return
        if request.error is not None:
            future.set_exception(request.error)
            return
        block, body = request.block, request.body
        if block is not None and body is not None and not verify(block, body):
            error = KVStoreCorruptError(f"block {request.key.hex()} failed its checksum")
            future.set_exception(error)
            return
        future.set_result(request)


class AsyncKVStoreClient:
    """Asyncio client of one store node at ``endpoint`` (``"host:port"``); connects lazily."""

    def __init__(self, endpoint: str, timeout_s: float = 10.0) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"endpoint must be HOST:PORT, got {endpoint!r}")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._address = (host.strip("[]"), int(port))
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()
        self._ids = itertools.count(1)

    # -- public API -------------------------------------------------------------------------------

    async def match_prefix(self, chains: Sequence[Sequence[bytes]]) -> list[MatchResult]:
        """Per key chain (a prompt's block keys), the held prefix depth per tier."""
        requests: list[list[_Keyed]] = []
        for chain in chains:
            requests.append(
                [_Keyed(c, self._keyed(Op.MATCH_PREFIX, c)) for c in _key_chunks(chain)]
            )
        replies = await self._await([r.future for chain in requests for r in chain])
        results, position = [], 0
        for chain_requests in requests:
            tiers: list[int] = []
            complete = True  # every chunk so far matched in full
            for chunk_request in chain_requests:
                reply = replies[position]
                position += 1
                if complete:
                    body = _body(reply)
                    tiers.extend(body)
                    complete = len(body) == len(chunk_request.keys)
            depth = len(tiers)
            in_dram = next((i for i, t in enumerate(tiers) if t != Tier.DRAM), depth)
            results.append(MatchResult(depth, (0, in_dram, depth)))
        return results

    async def get(
        self, keys: Sequence[bytes], outs: Sequence[_Buffer] | None = None
    ) -> list[GetResult]:
        """Read blocks, pipelined: into ``outs[i]`` (writable, large enough) or as ``bytes``.

        A block that fails its checksum, names another key or does not fit its buffer raises
        after every reply of the call has been read (the connection stays usable).
        """
        if outs is not None and len(outs) != len(keys):
            raise ValueError("keys and outs differ in length")
        targets: list[memoryview | None] = []
        for i, key in enumerate(keys):
            _check_key(key)
            target = None
            if outs is not None:
                target = _writable_view(outs[i])
            targets.append(target)
        protocol = await self._connection()
        requests = []
        for key, target in zip(keys, targets, strict=True):
            request = self._request(protocol, Op.GET, key=key, target=target)
            if protocol.transport is not None and protocol.lost is None:
                frame = pack_frame_header(Op.GET, request.request_id, 1, KEY_BYTES)
                protocol.transport.write(frame + key)
            requests.append(request)
        replies = await self._await(requests)
        results = []
        for key, reply in zip(keys, replies, strict=True):
            header = reply.header
            assert header is not None
            if header.status == Status.MISS:
                results.append(GetResult(key, None))
                continue
            if header.status != Status.OK:
                raise KVStoreError(f"GET failed (status {header.status})")
            tier = Tier(header.count) if header.count in (Tier.DRAM, Tier.SSD) else Tier.DRAM
            body = reply.body
            assert body is not None
            data = bytes(body) if reply.target is None else None
            results.append(GetResult(key, body.nbytes, tier, data))
        return results

    async def put(self, items: Sequence[tuple[bytes, _Buffer]]) -> list[PutResult]:
        """Store blocks, pipelined; one :class:`PutResult` (OK, EXISTS, FULL) per item.

        The buffers must stay unchanged until the call returns (they are sent without a copy).
        """
        prepared = []
        for key, data in items:
            _check_key(key)
            view = memoryview(data)
            if not view.contiguous:
                raise ValueError("block buffers must be contiguous")
            view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
            prepared.append((key, encode_header(key, view), view))
        protocol = await self._connection()
        requests = []
        for key, block_header, view in prepared:
            await protocol.wait_writable()
            request = self._request(protocol, Op.PUT, key=key)
            requests.append(request)
            if protocol.transport is None or protocol.lost is not None:
                continue  # the request already failed
            length = BLOCK_HEADER_BYTES + view.nbytes
            frame = pack_frame_header(Op.PUT, request.request_id, 1, length)
            protocol.transport.writelines([frame, block_header, view])
        replies = await self._await(requests)
        results = []
        for (key, _, _), reply in zip(prepared, replies, strict=True):
            status = _status(reply)
            if status in (Status.OK, Status.EXISTS, Status.FULL):
                results.append(PutResult(key, PutStatus(status)))
            elif status == Status.CORRUPT:
                raise KVStoreCorruptError(f"the node received {key.hex()} corrupted")
            elif status == Status.TOO_LARGE:
                raise KVStoreError("block is larger than the node's max_block_bytes")
            else:
                raise KVStoreError(f"the node rejected the PUT (status {status})")
        return results

    async def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is held by the node (any tier)."""
        chunks = _key_chunks(keys)
        replies = await self._await([self._keyed(Op.EXISTS, c) for c in chunks])
        present: list[bool] = []
        for reply in replies:
            present.extend(decode_bitmap(_body(reply), _count(reply)))
        return present

    async def delete(self, keys: Sequence[bytes]) -> int:
        """Remove blocks from every tier; returns how many were held."""
        replies = await self._await([self._keyed(Op.DELETE, c) for c in _key_chunks(keys)])
        return sum(_count(reply) for reply in replies)

    async def stats(self) -> dict[str, Any]:
        """The node's counters (the STATS JSON)."""
        (reply,) = await self._await([self._keyed(Op.STATS, [])])
        value = json.loads(_body(reply))
        if not isinstance(value, dict):
            raise KVStoreError("STATS reply is not a JSON object")
        return value

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

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None and not protocol.closed.done():
            return protocol
        async with self._connecting:
            protocol = self._protocol
            if protocol is not None and protocol.lost is None and not protocol.closed.done():
                return protocol
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.timeout_s):
                    _, protocol = await loop.create_connection(_Protocol, *self._address)
            except (OSError, TimeoutError) as exc:
                raise KVStoreUnavailable(f"cannot connect to {self.endpoint}: {exc}") from exc
            self._protocol = protocol
            return protocol

    def _request(self, protocol: _Protocol, op: Op, **kwargs: Any) -> _Request:
        future = asyncio.get_running_loop().create_future()
        request = _Request(next(self._ids) & 0xFFFFFFFF, future, op, **kwargs)
        if protocol.lost is not None or protocol.transport is None:
            future.set_exception(protocol.lost or KVStoreConnectionLost("connection closed"))
        else:
            protocol.pending.append(request)
        return request

    def _keyed(self, op: Op, keys: Sequence[bytes]) -> asyncio.Future[_Request]:
        """Send one keyed (or empty) request once connected; a future of its reply."""

        async def run() -> _Request:
            protocol = await self._connection()
            request = self._request(protocol, op)
            payload = b"".join(keys)
            if protocol.transport is not None and protocol.lost is None:
                frame = pack_frame_header(op, request.request_id, len(keys), len(payload))
                protocol.transport.write(frame + payload)
            return cast(_Request, await request.future)

        return asyncio.ensure_future(run())

    async def _await(self, requests: Sequence[_Request | asyncio.Future[_Request]]) -> list[Any]:
        """Wait for every reply of one call, within the timeout; the first error wins."""
        futures = [r.future if isinstance(r, _Request) else r for r in requests]
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


@dataclass(frozen=True, slots=True)
class _Keyed:
    keys: Sequence[bytes]
    future: asyncio.Future[_Request]


def _status(reply: _Request) -> int:
    assert reply.header is not None
    return reply.header.status


def _count(reply: _Request) -> int:
    if _status(reply) != Status.OK:
        raise KVStoreError(f"{reply.op.name} failed (status {_status(reply)})")
    assert reply.header is not None
    return reply.header.count


def _body(reply: _Request) -> bytes:
    if reply.header is not None and reply.header.status != Status.OK:
        raise KVStoreError(f"{reply.op.name} failed (status {reply.header.status})")
    return b"" if reply.body is None else bytes(reply.body)


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"block keys are {KEY_BYTES} bytes, got {len(key)}")


def _key_chunks(keys: Sequence[bytes]) -> list[Sequence[bytes]]:
    for key in keys:
        _check_key(key)
    return [keys[i : i + MAX_KEYS_PER_FRAME] for i in range(0, len(keys), MAX_KEYS_PER_FRAME)]


def _writable_view(buffer: _Buffer) -> memoryview:
    view = memoryview(buffer)
    if not view.contiguous:
        raise ValueError("block buffers must be contiguous")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    if view.readonly:
        raise ValueError("outs must be writable")
    return view
