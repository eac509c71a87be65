"""Transport selection, RDMA probing and the transport ops' wire encoding (kvstore.transport.base,
kvstore.transport.rdma, kvstore.wire). RDMA itself cannot run on these machines: these tests pin the
decisions around it, with fakes standing in for pyverbs."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from kvstore.node.arena import Arena
from kvstore.transport import base as transport
from kvstore.transport.base import (
    DEFAULT_PREFERENCE,
    SkippedTransport,
    TransportKind,
    TransportUnavailable,
    select_transport,
)
from kvstore.transport.rdma import RdmaProbe, gid_from_text, gid_to_text, probe_rdma
from kvstore.transport.shm import ShmMemory
from kvstore.wire.frame import Status
from kvstore.wire.messages import LeaseBatchReply, RdmaEndpointInfo, ReserveBatchReply

SHM, RDMA, TCP = TransportKind.SHM, TransportKind.RDMA, TransportKind.TCP


class FakeMemory:
    def __init__(self, kind: TransportKind) -> None:
        self._kind = kind

    @property
    def kind(self) -> TransportKind:
        return self._kind

    @property
    def writable(self) -> bool:
        return True

    def mapped(self) -> None:
        return None

    def read_into(self, spans: Any, on_copied: Any = None) -> None:
        raise NotImplementedError

    def write_from(self, spans: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def unavailable(reason: str) -> Any:
    def attach() -> FakeMemory:
        raise TransportUnavailable(reason)

    return attach


@pytest.fixture(autouse=True)
def _fresh_log_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "_logged", set())


# -- selection -------------------------------------------------------------------------------------


def test_default_preference_is_shm_then_rdma_then_tcp() -> None:
    assert DEFAULT_PREFERENCE == (SHM, RDMA, TCP)
    assert [str(k) for k in TransportKind] == ["shm", "rdma", "tcp"]


def test_first_attachable_transport_wins_and_later_ones_are_not_tried() -> None:
    tried: list[TransportKind] = []

    def attach(kind: TransportKind) -> Any:
        def run() -> FakeMemory:
            tried.append(kind)
            return FakeMemory(kind)

        return run

    selection = select_transport(DEFAULT_PREFERENCE, {SHM: attach(SHM), RDMA: attach(RDMA)})
    assert (selection.kind, selection.skipped, tried) == (SHM, (), [SHM])
    assert selection.memory is not None and selection.memory.kind is SHM


def test_shm_unavailable_falls_back_to_rdma() -> None:
    selection = select_transport(
        DEFAULT_PREFERENCE,
        {SHM: unavailable("another host"), RDMA: lambda: FakeMemory(RDMA)},
    )
    assert selection.kind is RDMA
    assert selection.skipped == (SkippedTransport(SHM, "another host"),)


def test_everything_unavailable_falls_back_to_tcp_with_every_reason() -> None:
    selection = select_transport(
        DEFAULT_PREFERENCE,
        {SHM: unavailable("another host"), RDMA: unavailable("no RDMA devices")},
    )
    assert (selection.kind, selection.memory) == (TCP, None)
    assert selection.skipped == (
        SkippedTransport(SHM, "another host"),
        SkippedTransport(RDMA, "no RDMA devices"),
    )


def test_os_error_counts_as_unavailable_and_missing_attacher_as_not_offered() -> None:
    def broken() -> FakeMemory:
        raise PermissionError("denied")

    selection = select_transport((RDMA, SHM), {SHM: broken})
    assert selection.kind is TCP
    assert selection.skipped == (
        SkippedTransport(RDMA, "not offered"),
        SkippedTransport(SHM, "denied"),
    )


def test_tcp_in_the_preference_stops_the_search() -> None:
    selection = select_transport((TCP, SHM), {SHM: lambda: FakeMemory(SHM)})
    assert (selection.kind, selection.skipped) == (TCP, ())


def test_other_exceptions_propagate() -> None:
    def bug() -> FakeMemory:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        select_transport(DEFAULT_PREFERENCE, {SHM: bug})


def test_unavailability_is_logged_once_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kvstore.transport.base")
    attachers = {SHM: unavailable("another host"), RDMA: unavailable("no RDMA devices")}
    for _ in range(3):
        select_transport(DEFAULT_PREFERENCE, attachers)
    select_transport(DEFAULT_PREFERENCE, {RDMA: unavailable("pyverbs is missing")})
    assert [r.getMessage() for r in caplog.records] == [
        "shm transport unavailable: another host; falling back",
        "rdma transport unavailable: no RDMA devices; falling back",
        "rdma transport unavailable: pyverbs is missing; falling back",
    ]


# -- RDMA probe ------------------------------------------------------------------------------------


def fake_import(device_module: Any | Exception) -> Any:
    def import_module(name: str) -> ModuleType:
        assert name == "pyverbs.device"
        if isinstance(device_module, Exception):
            raise device_module
        return device_module  # type: ignore[no-any-return]

    return import_module


class ListFails:
    @staticmethod
    def get_device_list() -> list[Any]:
        raise OSError("Failed to get devices list")


def test_probe_without_pyverbs() -> None:
    probe = probe_rdma(fake_import(ModuleNotFoundError("No module named 'pyverbs'")))
    assert probe == RdmaProbe(
        False, "pyverbs is not importable (ModuleNotFoundError: No module named 'pyverbs')"
    )


def test_probe_when_the_device_list_fails() -> None:
    # What Debian's python3-pyverbs does on a kernel without InfiniBand support.
    probe = probe_rdma(fake_import(ListFails()))
    assert probe == RdmaProbe(
        False, "cannot list RDMA devices (OSError: Failed to get devices list)"
    )


def test_probe_with_no_devices_and_with_devices() -> None:
    empty = SimpleNamespace(get_device_list=lambda: [])
    assert probe_rdma(fake_import(empty)) == RdmaProbe(False, "no RDMA devices")
    devices = [SimpleNamespace(name=b"mlx5_0"), SimpleNamespace(name="rxe0")]
    found = SimpleNamespace(get_device_list=lambda: devices)
    assert probe_rdma(fake_import(found)) == RdmaProbe(True, "", ("mlx5_0", "rxe0"))


def test_gid_text_roundtrip() -> None:
    gid = bytes.fromhex("fe800000000000000202c9fffe0a0b0c")
    assert gid_to_text(gid) == "fe80:0000:0000:0000:0202:c9ff:fe0a:0b0c"
    assert gid_from_text(gid_to_text(gid)) == gid
    assert gid_from_text("fe80:0:0:0:202:c9ff:fe0a:b0c") == gid
    with pytest.raises(ValueError):
        gid_to_text(b"short")
    with pytest.raises(ValueError):
        gid_from_text("fe80::1")


# -- wire encoding ---------------------------------------------------------------------------------


def rdma_info(**overrides: Any) -> RdmaEndpointInfo:
    fields: dict[str, Any] = {
        "qp_num": 0x1234,
        "psn": 0xABCDE,
        "lid": 7,
        "gid": bytes(range(16)),
        "mtu": 5,
        "address": 0x7F00_0000_1000,
        "length": 2 << 30,
        "rkey": 0xDEADBEEF,
    }
    fields.update(overrides)
    return RdmaEndpointInfo(**fields)


def test_rdma_endpoint_info_layout_and_roundtrip() -> None:
    info = rdma_info()
    raw = info.encode()
    assert raw == struct.pack(
        "<BBHII16sQQI", 1, 5, 7, 0x1234, 0xABCDE, bytes(range(16)), 0x7F00_0000_1000, 2 << 30,
        0xDEADBEEF,
    )  # fmt: skip
    assert len(raw) == 48
    assert RdmaEndpointInfo.decode(raw) == info


@pytest.mark.parametrize(
    "overrides",
    [
        {"gid": b"x" * 15},
        {"psn": 1 << 24},
        {"qp_num": 1 << 24},
        {"mtu": 0},
        {"mtu": 6},
        {"rkey": -1},
    ],
    ids=["gid", "psn", "qp", "mtu0", "mtu6", "rkey"],
)
def test_rdma_endpoint_info_rejects_bad_fields(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        rdma_info(**overrides)


def test_rdma_endpoint_info_decode_rejects_length_and_version() -> None:
    raw = rdma_info().encode()
    with pytest.raises(ValueError, match="48 bytes"):
        RdmaEndpointInfo.decode(raw[:-1])
    with pytest.raises(ValueError, match="version 2"):
        RdmaEndpointInfo.decode(b"\x02" + raw[1:])


def test_lease_batch_reply_layout() -> None:
    reply = LeaseBatchReply(9, ((4096, 64 + 10), (0, 0), (0, 0)), bytes([1, 0, 255]))
    raw = reply.encode()
    assert raw == struct.pack("<QQQQQQQ", 9, 4096, 74, 0, 0, 0, 0) + b"\x01\x00\xff"
    assert LeaseBatchReply.decode(raw, 3) == reply
    with pytest.raises(ValueError):
        LeaseBatchReply.decode(raw, 2)
    with pytest.raises(ValueError):
        LeaseBatchReply(1, ((0, 0),), b"").encode()


def test_reserve_batch_reply_layout() -> None:
    reply = ReserveBatchReply(3, (8192, 0), bytes([Status.OK, Status.EXISTS]))
    raw = reply.encode()
    assert raw == struct.pack("<QQQ", 3, 8192, 0) + b"\x00\x01"
    assert ReserveBatchReply.decode(raw, 2) == reply
    with pytest.raises(ValueError):
        ReserveBatchReply.decode(raw + b"\x00", 2)


# -- shared memory ---------------------------------------------------------------------------------


def arena_info(arena: Arena, boot_id: str = "boot-a") -> dict[str, Any]:
    return {
        "path": arena.path,
        "size": arena.size,
        "device": arena.device,
        "inode": arena.inode,
        "boot_id": boot_id,
    }


def test_shm_attach_maps_the_same_file_and_copies_both_ways(tmp_path: Path) -> None:
    with Arena(64 * 1024, directory=str(tmp_path), prefault=False) as arena:
        extent = arena.allocate(8192)
        assert extent is not None
        arena.view(extent)[:5] = b"hello"
        memory = ShmMemory.attach(arena_info(arena), local_boot_id="boot-a")
        try:
            assert (memory.kind, memory.writable, memory.size) == (SHM, True, 64 * 1024)
            assert memory.mapped()[extent.offset : extent.offset + 5] == b"hello"
            out = memoryview(bytearray(5))
            copied: list[int] = []
            memory.read_into([(extent.offset, out)], copied.append)
            assert (bytes(out), copied) == (b"hello", [0])
            memory.write_from([(extent.offset + 5, [memoryview(b", "), memoryview(b"world")])])
            assert bytes(arena.view(extent, 12)) == b"hello, world"
            with pytest.raises(ValueError, match="outside the arena"):
                memory.read_into([(64 * 1024 - 2, memoryview(bytearray(4)))])
        finally:
            memory.close()


def test_shm_attach_refuses_another_kernel_or_another_file(tmp_path: Path) -> None:
    with Arena(64 * 1024, directory=str(tmp_path), prefault=False) as arena:
        with pytest.raises(TransportUnavailable, match="boot id differs"):
            ShmMemory.attach(arena_info(arena, "boot-b"), local_boot_id="boot-a")
        with pytest.raises(TransportUnavailable, match="boot id differs"):
            ShmMemory.attach(arena_info(arena, ""), local_boot_id="")
        wrong = arena_info(arena) | {"inode": arena.inode + 1}
        with pytest.raises(TransportUnavailable, match="not the node's arena"):
            ShmMemory.attach(wrong, local_boot_id="boot-a")
        missing = arena_info(arena) | {"path": str(tmp_path / "gone")}
        with pytest.raises(TransportUnavailable, match="cannot open"):
            ShmMemory.attach(missing, local_boot_id="boot-a")


def test_arena_offset_of_pending_views(tmp_path: Path) -> None:
    with Arena(64 * 1024, page_size=4096, directory=str(tmp_path), prefault=False) as arena:
        first, second = arena.allocate(5000), arena.allocate(100)
        assert first is not None and second is not None
        assert arena.offset_of(arena.view(second, 64)) == second.offset == 8192
        assert arena.offset_of(arena.view(first)) == 0
        with pytest.raises(ValueError):
            arena.offset_of(memoryview(bytearray(64)))
