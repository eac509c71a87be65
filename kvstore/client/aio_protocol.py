"""The receiving side of :class:`kvstore.client.aio.AsyncKVStoreClient`'s connection: an
``asyncio.BufferedProtocol`` that parses reply frames in place and matches each to the oldest
outstanding request (the node answers in request order).

Frame headers and small payloads land in one preallocated buffer; a GET's payload goes straight
into the caller's buffer (or one new buffer per block) and is checked against its block header's
checksum before the request completes. A reply that breaks the protocol aborts the connection:
every outstanding request fails with the reason.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

from kvstore.blocks.format import BLOCK_HEADER_BYTES, BlockHeader, verify
from kvstore.errors import KVStoreConnectionLost, KVStoreError
from kvstore.wire import replies
from kvstore.wire.frame import FRAME_HEADER_BYTES, FrameError, FrameHeader, Op, Status

__all__ = ["PendingRequest", "ReplyProtocol"]

_RECV_BUFFER_BYTES = 256 * 1024
_WRITE_HIGH_WATER = 4 * 1024 * 1024


@dataclass(slots=True)
class PendingRequest:
    """An outstanding request: how to receive its reply and where to deliver it."""

    request_id: int
    future: asyncio.Future[Any]
    op: Op
    asked: int = 1  # keys in the request: bounds its reply (kvstore.wire.replies.reply_limit)
    key: bytes = b""
    target: memoryview | None = None  # GET into a caller buffer
    header: FrameHeader | None = None
    block: BlockHeader | None = None
    body: memoryview | None = None
    error: KVStoreError | None = field(default=None)


class ReplyProtocol(asyncio.BufferedProtocol):
    """Frame parser of one connection; replies are matched to requests in order."""

    def __init__(self, max_block_bytes: int) -> None:
        self.max_block_bytes = max_block_bytes
        self.transport: asyncio.Transport | None = None
        self.pending: deque[PendingRequest] = deque()
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
        except FrameError as exc:
            self.abort(KVStoreError(f"garbled reply from the node: {exc}"))
        except KVStoreError as exc:
            self.abort(exc)

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
            header = replies.decode_reply_header(
                self._view,
                self._start,
                request.request_id,
                request.op,
                max_block_bytes=self.max_block_bytes,
                asked=request.asked,
            )
            body = self._start + FRAME_HEADER_BYTES
            length = header.payload_len
            request.header = header
            if request.op is Op.GET and header.status != Status.MISS:
                try:
                    replies.get_hit(header)
                except KVStoreError as exc:
                    request.error = exc
                    self._start = body
                    self._receive_into(request, None, length)
                    continue
                # The block header first (small: wait for it in the buffer), then the payload.
                if avail < FRAME_HEADER_BYTES + BLOCK_HEADER_BYTES:
                    break
                self._start = body + BLOCK_HEADER_BYTES
                self._begin_block(request, length, body)
            else:
                self._start = body
                request.body = memoryview(bytearray(length))
                self._receive_into(request, request.body)

    def _begin_block(self, request: PendingRequest, length: int, header_at: int) -> None:
        nbytes = length - BLOCK_HEADER_BYTES
        raw = self._view[header_at : header_at + BLOCK_HEADER_BYTES]
        try:
            block = replies.decode_block_header(raw, length, request.key)
        except KVStoreError as exc:
            request.error = exc
            self._receive_into(request, None, nbytes)
            return
        request.block = block
        target = request.target
        if target is None:
            request.body = memoryview(bytearray(nbytes))
            self._receive_into(request, request.body)
        elif nbytes > target.nbytes:
            request.error = replies.block_too_large(nbytes, target.nbytes)
            self._receive_into(request, None, nbytes)
        else:
            request.body = target[:nbytes]
            self._receive_into(request, request.body)

    def _receive_into(
        self, request: PendingRequest, sink: memoryview | None, nbytes: int = 0
    ) -> None:
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

    def _complete(self, request: PendingRequest) -> None:
        future = request.future
        if future.done():  # cancelled by its caller; the reply is consumed all the same
            return
        if request.error is not None:
            future.set_exception(request.error)
            return
        block, body = request.block, request.body
        if block is not None and body is not None and not verify(block, body):
            future.set_exception(replies.corrupt_block(request.key))
            return
        future.set_result(request)
