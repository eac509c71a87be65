"""Both clients give the same result or raise the same error for the same reply bytes.

Each case plays one recorded reply (built here, byte-exact) from a tiny fake node over a real
loopback socket, to the synchronous :class:`KVStoreClient` and to the asyncio
:class:`AsyncKVStoreClient` calling the same method with the same arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from kvstore.blocks.format import BLOCK_HEADER_BYTES, encode_header
from kvstore.blocks.tier import Tier
from kvstore.client.aio import AsyncKVStoreClient
from kvstore.client.sync import KVStoreClient
from kvstore.errors import KVStoreConnectionLost, KVStoreCorruptError, KVStoreError
from kvstore.transport.base import TransportKind
from kvstore.transport.tcp import recv_exact
from kvstore.wire.frame import (
    FLAG_MATCH_HINT,
    FRAME_HEADER_BYTES,
    MAX_KEYS_PER_FRAME,
    FrameHeader,
    Op,
    Status,
    pack_frame_header,
)
from kvstore.wire.messages import encode_match_hint
from kvstore.wire.types import NodeMatch, PutStatus

KEY = bytes(range(16))
OTHER = bytes(range(1, 17))
DATA = bytes(range(200))

Reply = Callable[[int], bytes]
"""The reply bytes, given the request id the client chose."""


def frame(op: Op, status: int = Status.OK, count: int = 0, body: bytes = b"") -> Reply:
    return lambda rid: pack_frame_header(op, rid, count, len(body), status) + body


def claim(op: Op, payload_len: int, count: int = 0, status: int = Status.OK) -> Reply:
    """A reply header claiming ``payload_len`` bytes that never come (a hostile node's)."""
    return lambda rid: pack_frame_header(op, rid, count, payload_len, status)


def block(key: bytes = KEY, data: bytes = DATA) -> bytes:
    return encode_header(key, memoryview(data)) + data


def corrupted(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 0xFF])


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    args: tuple[Any, ...]
    reply: Reply
    expected: object  # a result, or an exception type
    kwargs: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("put ok", "put", (KEY, DATA), frame(Op.PUT), PutStatus.OK),
    Case("put exists", "put", (KEY, DATA), frame(Op.PUT, Status.EXISTS), PutStatus.EXISTS),
    Case("put full", "put", (KEY, DATA), frame(Op.PUT, Status.FULL), PutStatus.FULL),
    Case("put corrupt", "put", (KEY, DATA), frame(Op.PUT, Status.CORRUPT), KVStoreCorruptError),
    Case("put too large", "put", (KEY, DATA), frame(Op.PUT, Status.TOO_LARGE), KVStoreError),
    Case("put refused", "put", (KEY, DATA), frame(Op.PUT, Status.BAD_REQUEST), KVStoreError),
    Case("put_many", "put_many", ([(KEY, DATA)],), frame(Op.PUT), [PutStatus.OK]),
    Case("get hit", "get", (KEY,), frame(Op.GET, count=1, body=block()), DATA),
    Case("get miss", "get", (KEY,), frame(Op.GET, Status.MISS), None),
    Case("get refused", "get", (KEY,), frame(Op.GET, Status.BAD_REQUEST), KVStoreError),
    Case("get short", "get", (KEY,), frame(Op.GET, body=b"x" * 10), KVStoreError),
    Case(
        "get bad header",
        "get",
        (KEY,),
        frame(Op.GET, body=b"\0" * BLOCK_HEADER_BYTES + DATA),
        KVStoreCorruptError,
    ),
    Case(
        "get length mismatch",
        "get",
        (KEY,),
        frame(Op.GET, body=block() + b"extra"),
        KVStoreCorruptError,
    ),
    Case("get other key", "get", (KEY,), frame(Op.GET, body=block(OTHER)), KVStoreCorruptError),
    Case(
        "get checksum", "get", (KEY,), frame(Op.GET, body=corrupted(block())), KVStoreCorruptError
    ),
    Case("get_into", "get_into", (KEY, bytearray(300)), frame(Op.GET, body=block()), len(DATA)),
    Case(
        "get_into small",
        "get_into",
        (KEY, bytearray(10)),
        frame(Op.GET, body=block()),
        KVStoreError,
    ),
    Case(
        "get_many_into",
        "get_many_into",
        ([KEY], [bytearray(300)]),
        frame(Op.GET, Status.MISS),
        [None],
    ),
    Case(
        "match tiers",
        "match_prefix_tiers",
        ([KEY, OTHER, KEY],),
        frame(Op.MATCH_PREFIX, count=2, body=bytes([Tier.DRAM, Tier.SSD])),
        NodeMatch(2, (Tier.DRAM, Tier.SSD)),
    ),
    Case(
        "match without tiers",
        "match_prefix_tiers",
        ([KEY, OTHER],),
        frame(Op.MATCH_PREFIX, count=2),
        NodeMatch(2, (Tier.DRAM, Tier.DRAM)),
    ),
    Case(
        "match depth",
        "match_prefix",
        ([KEY, OTHER],),
        frame(Op.MATCH_PREFIX, count=1, body=bytes([Tier.SSD])),
        1,
    ),
    Case(
        "match refused",
        "match_prefix",
        ([KEY],),
        frame(Op.MATCH_PREFIX, Status.BAD_REQUEST),
        KVStoreError,
    ),
    Case(
        "match with a hint",
        "match_prefix_tiers",
        ([KEY, OTHER],),
        frame(Op.MATCH_PREFIX, count=2, body=bytes([Tier.DRAM, Tier.SSD])),
        NodeMatch(2, (Tier.DRAM, Tier.SSD)),
        {"hint": "node-a"},
    ),
    Case(
        "match depth with a hint",
        "match_prefix",
        ([KEY, OTHER],),
        frame(Op.MATCH_PREFIX, count=1, body=bytes([Tier.SSD])),
        1,
        {"hint": "node-a"},
    ),
    Case(
        "exists",
        "exists",
        ([KEY, OTHER, KEY],),
        frame(Op.EXISTS, count=3, body=b"\x05"),
        [True, False, True],
    ),
    Case(
        "exists bad bitmap",
        "exists",
        ([KEY],),
        frame(Op.EXISTS, count=1, body=b"\x01\x00"),
        KVStoreCorruptError,
    ),
    Case(  # a hostile count: more matched keys than were asked about
        "match count beyond the keys",
        "match_prefix",
        ([KEY],),
        frame(Op.MATCH_PREFIX, count=0xFFFFFFFF),
        KVStoreCorruptError,
    ),
    Case(
        "match tiers count beyond the keys",
        "match_prefix_tiers",
        ([KEY],),
        frame(Op.MATCH_PREFIX, count=0xFFFFFFFF),
        KVStoreCorruptError,
    ),
    Case(
        "exists answers other keys",
        "exists",
        ([KEY, OTHER],),
        frame(Op.EXISTS, count=1, body=b"\x01"),
        KVStoreCorruptError,
    ),
    Case("delete", "delete", ([KEY, OTHER],), frame(Op.DELETE, count=1), 1),
    Case("delete refused", "delete", ([KEY],), frame(Op.DELETE, Status.FULL), KVStoreError),
    Case("stats", "stats", (), frame(Op.STATS, body=b'{"a": 1}'), {"a": 1}),
    Case("stats not an object", "stats", (), frame(Op.STATS, body=b"[1]"), KVStoreError),
    Case("stats garbled", "stats", (), frame(Op.STATS, body=b"{"), KVStoreCorruptError),
    Case(
        "reply to another request",
        "delete",
        ([KEY],),
        lambda rid: frame(Op.DELETE)(rid + 1),
        KVStoreError,
    ),
    Case(
        "bad magic", "delete", ([KEY],), lambda rid: b"X" + frame(Op.DELETE)(rid)[1:], KVStoreError
    ),
    Case(
        "reply of another op",
        "delete",
        ([KEY],),
        lambda rid: frame(Op.STATS, body=b"{}")(rid),
        KVStoreError,
    ),
    # Replies claiming more than any reply to the request can carry: refused on the header,
    # before anything is allocated or read (the payload never comes: a wait would time out).
    Case("get claims 1 GiB", "get", (KEY,), claim(Op.GET, 1 << 30, 1), KVStoreCorruptError),
    Case(
        "get claims a block over max_block_bytes",
        "get",
        (KEY,),
        claim(Op.GET, (64 << 20) + 1, 1),
        KVStoreCorruptError,
    ),
    Case(
        "get_into claims 1 GiB",
        "get_into",
        (KEY, bytearray(300)),
        claim(Op.GET, 1 << 30, 1),
        KVStoreCorruptError,
    ),
    Case("put reply with a payload", "put", (KEY, DATA), claim(Op.PUT, 1), KVStoreCorruptError),
    Case(
        "match claims more tiers than keys",
        "match_prefix_tiers",
        ([KEY, OTHER],),
        claim(Op.MATCH_PREFIX, 3, count=2),
        KVStoreCorruptError,
    ),
    Case(
        "exists claims a huge bitmap",
        "exists",
        ([KEY],),
        claim(Op.EXISTS, 64 << 20, count=1),
        KVStoreCorruptError,
    ),
    Case(
        "delete count beyond the keys",
        "delete",
        ([KEY, OTHER],),
        frame(Op.DELETE, count=3),
        KVStoreCorruptError,
    ),
    Case("delete with a payload", "delete", ([KEY],), claim(Op.DELETE, 8), KVStoreCorruptError),
    Case("stats claims 2 MiB", "stats", (), claim(Op.STATS, 2 << 20), KVStoreCorruptError),
    Case(
        "stats of 1 MiB",
        "stats",
        (),
        frame(Op.STATS, body=b'{"a": "' + b"x" * ((1 << 20) - 10) + b'"}'),
        {"a": "x" * ((1 << 20) - 10)},
    ),
]


class FakeNode:
    """A node that answers requests of the case's opcode with ``replies`` in turn (the last one
    again and again: a refetch of a damaged block gets it again), answers DELETE with OK, and
    records the opcodes it was sent."""

    def __init__(self, replies: Sequence[Reply]) -> None:
        self.replies = replies
        self.seen: list[Op] = []
        self.requests: list[tuple[FrameHeader, bytes]] = []
        """Every request (its header, request id 0, and its payload)."""
        self.server = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()
        host, port = self.server.getsockname()
        self.endpoint = f"{host}:{port}"

    def _serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:  # closed unused: a call refused before it connected
            return
        first: Op | None = None
        with conn:
            raw = bytearray(FRAME_HEADER_BYTES)
            try:
                while True:
                    recv_exact(conn, memoryview(raw))
                    header = FrameHeader.decode(raw)
                    payload = bytearray(header.payload_len)
                    recv_exact(conn, memoryview(payload))
                    self.seen.append(header.opcode)
                    self.requests.append((dataclasses.replace(header, request_id=0), payload))
                    first = first or header.opcode
                    if header.opcode is first:
                        answered = self.seen.count(first) - 1
                        reply = self.replies[min(answered, len(self.replies) - 1)]
                        conn.sendall(reply(header.request_id))
                    elif header.opcode is Op.DELETE:
                        conn.sendall(frame(Op.DELETE, count=header.count)(header.request_id))
            except (ConnectionError, OSError):
                pass


@pytest.fixture
def fake_node() -> Iterator[Callable[..., str]]:
    """``fake_node(reply, *later_replies)`` -> the endpoint of a :class:`FakeNode`."""
    nodes: list[FakeNode] = []

    def start(*replies: Reply) -> str:
        nodes.append(FakeNode(replies))
        return nodes[-1].endpoint

    yield start
    for node in nodes:
        node.server.close()


def outcome(call: Callable[[], Any]) -> tuple[str, object]:
    try:
        return "result", call()
    except KVStoreError as exc:
        return "error", type(exc)


def run_sync(endpoint: str, case: Case) -> tuple[str, object]:
    with KVStoreClient(endpoint, timeout_s=5, transports=(TransportKind.TCP,)) as client:
        return outcome(lambda: getattr(client, case.method)(*case.args, **case.kwargs))


def run_async(endpoint: str, case: Case) -> tuple[str, object]:
    async def call() -> Any:
        async with AsyncKVStoreClient(endpoint, timeout_s=5) as client:
            return await getattr(client, case.method)(*case.args, **case.kwargs)

    return outcome(lambda: asyncio.run(call()))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_both_clients_read_a_reply_alike(case: Case, fake_node: Callable[..., str]) -> None:
    expected = (
        ("error", case.expected)
        if isinstance(case.expected, type) and issubclass(case.expected, Exception)
        else ("result", case.expected)
    )
    assert run_sync(fake_node(case.reply), case) == expected
    assert run_async(fake_node(case.reply), case) == expected


@pytest.mark.parametrize("hint", [None, "node-a", "ä" * 127])
def test_both_clients_send_the_same_match_prefix_frames(hint: str | None) -> None:
    """Byte for byte (but the request id): the keys, then with a hint FLAG_MATCH_HINT and the
    hint; a chain longer than one frame is split alike, the hint in every frame."""
    keys = [n.to_bytes(16, "big") for n in range(MAX_KEYS_PER_FRAME + 3)]
    sent = []
    for run in (run_sync, run_async):
        replies = [frame(Op.MATCH_PREFIX, count=MAX_KEYS_PER_FRAME), frame(Op.MATCH_PREFIX)]
        node = FakeNode(replies)
        case = Case("", "match_prefix", (keys,), replies[0], MAX_KEYS_PER_FRAME, {"hint": hint})
        assert run(node.endpoint, case) == ("result", MAX_KEYS_PER_FRAME)
        sent.append(node.requests)
        node.server.close()
    assert sent[0] == sent[1]
    suffix = b"" if hint is None else encode_match_hint(hint)
    flags = 0 if hint is None else FLAG_MATCH_HINT
    assert [(h.flags, h.count, bytes(p)) for h, p in sent[0]] == [
        (flags, MAX_KEYS_PER_FRAME, b"".join(keys[:MAX_KEYS_PER_FRAME]) + suffix),
        (flags, 3, b"".join(keys[MAX_KEYS_PER_FRAME:]) + suffix),
    ]


@pytest.mark.parametrize("hint", ["", "x" * 256])
def test_both_clients_refuse_a_hint_no_frame_can_carry(hint: str) -> None:
    node = FakeNode([frame(Op.MATCH_PREFIX)])
    client = KVStoreClient(node.endpoint, timeout_s=5, transports=(TransportKind.TCP,))
    with client, pytest.raises(ValueError):
        client.match_prefix([KEY], hint=hint)

    async def call() -> None:
        async with AsyncKVStoreClient(node.endpoint, timeout_s=5) as aio:
            await aio.match_prefix_tiers([KEY], hint=hint)

    with pytest.raises(ValueError):
        asyncio.run(call())
    assert node.seen == []  # refused before anything was sent
    node.server.close()


def test_the_clients_have_the_same_methods() -> None:
    def public(cls: type) -> set[str]:
        return {name for name in vars(cls) if not name.startswith("_")}

    assert public(KVStoreClient) - {"transport"} == public(AsyncKVStoreClient)


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_block_that_fails_once_is_fetched_again(client: str) -> None:
    node = FakeNode([frame(Op.GET, body=corrupted(block())), frame(Op.GET, body=block())])
    run = run_sync if client == "sync" else run_async
    assert run(node.endpoint, Case("", "get", (KEY,), node.replies[0], DATA)) == ("result", DATA)
    assert node.seen == [Op.GET, Op.GET]  # a transfer error: nothing deleted
    node.server.close()


@pytest.mark.parametrize("client", ["sync", "async"])
@pytest.mark.parametrize("reply", [corrupted(block()), block(OTHER)], ids=["checksum", "other key"])
def test_a_block_that_fails_twice_is_deleted_from_the_node(client: str, reply: bytes) -> None:
    node = FakeNode([frame(Op.GET, body=reply)])
    run = run_sync if client == "sync" else run_async
    case = Case("", "get", (KEY,), node.replies[0], KVStoreCorruptError)
    assert run(node.endpoint, case) == ("error", KVStoreCorruptError)
    assert node.seen == [Op.GET, Op.GET, Op.DELETE]
    node.server.close()


class ClosingNode:
    """A node that answers a STATS, then closes the connection after reading the next request
    without answering it -- what a client sees when the node's idle timeout closes its pooled
    connection just as it sends -- and does the same on every later connection. With
    ``answer=False`` it closes each connection on its first request."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.connections = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()
        host, port = self.server.getsockname()
        self.endpoint = f"{host}:{port}"

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                self.connections += 1
                with conn:
                    raw = bytearray(FRAME_HEADER_BYTES)
                    recv_exact(conn, memoryview(raw))
                    if not self.answer:
                        continue
                    header = FrameHeader.decode(raw)
                    recv_exact(conn, memoryview(bytearray(header.payload_len)))
                    conn.sendall(frame(Op.STATS, body=b"{}")(header.request_id))
                    recv_exact(conn, memoryview(raw))  # the next request: closed unanswered


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_connection_the_node_closed_is_replaced_once_transparently(client: str) -> None:
    """The second call finds its (pooled) connection closed: it reconnects and is answered on
    the new connection; the third call finds that one closed too and is answered on a third.
    A connection that breaks before answering the call that opened it is not retried."""
    node = ClosingNode()
    if client == "sync":
        with KVStoreClient(node.endpoint, timeout_s=5, transports=(TransportKind.TCP,)) as sync:
            assert [sync.stats(), sync.stats(), sync.stats()] == [{}, {}, {}]
    else:

        async def calls() -> list[dict[str, Any]]:
            async with AsyncKVStoreClient(node.endpoint, timeout_s=5) as aio:
                return [await aio.stats(), await aio.stats(), await aio.stats()]

        assert asyncio.run(calls()) == [{}, {}, {}]
    assert node.connections == 3
    node.server.close()


@pytest.mark.parametrize("client", ["sync", "async"])
def test_a_connection_that_breaks_on_its_first_call_is_not_retried(client: str) -> None:
    node = ClosingNode(answer=False)
    case = Case("", "stats", (), frame(Op.STATS), KVStoreConnectionLost)
    run = run_sync if client == "sync" else run_async
    assert run(node.endpoint, case) == ("error", KVStoreConnectionLost)
    assert node.connections == 1
    node.server.close()
