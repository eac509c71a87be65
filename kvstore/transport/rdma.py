"""RDMA data path (pyverbs): the node's arena registered as a memory region, one-sided access.

**Not exercised on the machines this project is developed on**: their kernel has no InfiniBand
support, so no RDMA device (real, Soft-RoCE or siw) can exist, Debian's pyverbs fails at the device
list and pip's pyverbs does not build (/work/shared/notes/machine-limits.md). What runs here is
:func:`probe_rdma` (which reports exactly that and makes every client fall back), the selection
and fallback logic in kvstore.transport.base and the RDMA_CONNECT message encoding; both are
unit-tested. The verbs code below follows the pyverbs API of rdma-core >= 44 (the object model of
its ``tests/base.py``) and has never run against a device: treat it as untested.

Design
    * Node: on the first RDMA_CONNECT it opens the first device (or ``STRATA_RDMA_DEVICE``),
      registers the whole arena once (``REMOTE_READ | REMOTE_WRITE``; registration pins the
      pages, and the arena is preallocated and prefaulted anyway) and then, per connection,
      creates a reliable-connected QP and moves it INIT -> RTR -> RTS towards the client's QP.
      The node's CPU never touches the data path afterwards.
    * Client: a registered staging buffer (``staging_bytes``). A batch of leased blocks is one
      chain of RDMA READ work requests (arena span -> staging), one completion poll, then a copy
      from staging into the caller's buffers; PUTs copy into staging and RDMA WRITE into the
      reserved extents. Registering each caller buffer instead would save that copy but costs a
      registration (a syscall and page pinning) per buffer, more than the copy for KV-sized
      blocks unless buffers are reused -- a registration cache is the obvious next step.
    * Keys and addresses travel over the TCP control channel (RDMA_CONNECT,
      :class:`kvstore.wire.messages.RdmaEndpointInfo`); leases and reservations are the same
      LEASE_BATCH / RESERVE_BATCH / COMMIT_BATCH messages as for shared memory.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

from kvstore.transport.base import TransportKind, TransportUnavailable
from kvstore.wire.messages import RdmaEndpointInfo

__all__ = [
    "RdmaClientMemory",
    "RdmaNodeEndpoint",
    "RdmaProbe",
    "gid_to_text",
    "local_rdma",
    "probe_rdma",
]

DEFAULT_STAGING_BYTES = 64 * 1024 * 1024
_PORT = 1
_GID_INDEX = 0
_COMPLETION_TIMEOUT_S = 10.0
_MAX_RD_ATOMIC = 16
_MAX_SEND_WR = 256


@dataclass(frozen=True, slots=True)
class RdmaProbe:
    """Whether this process can use RDMA: ``devices`` found, or ``reason`` why not."""

    available: bool
    reason: str
    devices: tuple[str, ...] = ()


def probe_rdma(import_module: Callable[[str], ModuleType] = importlib.import_module) -> RdmaProbe:
    """Import pyverbs and list the RDMA devices; any failure means "unavailable, because ...".

    ``import_module`` is injectable so that the decision table is testable without pyverbs.
    """
    try:
        device = import_module("pyverbs.device")
    except Exception as exc:  # ImportError, or a broken build failing at import
        return RdmaProbe(False, f"pyverbs is not importable ({type(exc).__name__}: {exc})")
    try:
        devices = device.get_device_list()
    except Exception as exc:  # PyverbsRDMAError: "Failed to get devices list"
        return RdmaProbe(False, f"cannot list RDMA devices ({type(exc).__name__}: {exc})")
    names = tuple(_device_name(d) for d in devices)
    if not names:
        return RdmaProbe(False, "no RDMA devices")
    return RdmaProbe(True, "", names)


@functools.cache
def local_rdma() -> RdmaProbe:
    """:func:`probe_rdma` for this process, probed once."""
    return probe_rdma()


def _device_name(dev: Any) -> str:
    name = dev.name
    return name.decode() if isinstance(name, bytes) else str(name)


def gid_to_text(gid: bytes) -> str:
    """16 raw GID bytes in pyverbs' ``GID`` text form (eight colon-separated 16-bit groups)."""
    if len(gid) != 16:
        raise ValueError(f"an RDMA GID is 16 bytes, got {len(gid)}")
    hexed = gid.hex()
    return ":".join(hexed[i : i + 4] for i in range(0, 32, 4))


def gid_from_text(text: str) -> bytes:
    """Inverse of :func:`gid_to_text` (also accepts the groups without leading zeros)."""
    groups = text.split(":")
    if len(groups) != 8:
        raise ValueError(f"not a GID: {text!r}")
    return b"".join(int(g or "0", 16).to_bytes(2, "big") for g in groups)


class _Verbs:
    """The pyverbs modules and one opened device: context, protection domain, port, GID."""

    def __init__(self) -> None:
        probe = local_rdma()
        if not probe.available:
            raise TransportUnavailable(probe.reason)
        try:
            self.device = importlib.import_module("pyverbs.device")
            self.pd_mod = importlib.import_module("pyverbs.pd")
            self.mr_mod = importlib.import_module("pyverbs.mr")
            self.cq_mod = importlib.import_module("pyverbs.cq")
            self.qp_mod = importlib.import_module("pyverbs.qp")
            self.wr_mod = importlib.import_module("pyverbs.wr")
            self.addr_mod = importlib.import_module("pyverbs.addr")
            self.e = importlib.import_module("pyverbs.enums")
            name = os.environ.get("STRATA_RDMA_DEVICE") or probe.devices[0]
            self.ctx = self.device.Context(name=name)
            self.pd = self.pd_mod.PD(self.ctx)
            self.port_attr = self.ctx.query_port(_PORT)
            self.gid = gid_from_text(self.ctx.query_gid(_PORT, _GID_INDEX).gid)
        except TransportUnavailable:
            raise
        except Exception as exc:
            raise TransportUnavailable(f"cannot open the RDMA device: {exc}") from exc

    def create_qp(self) -> tuple[Any, Any]:
        cq = self.cq_mod.CQ(self.ctx, 2 * _MAX_SEND_WR)
        cap = self.qp_mod.QPCap(
            max_send_wr=_MAX_SEND_WR, max_recv_wr=1, max_send_sge=1, max_recv_sge=1
        )
        init = self.qp_mod.QPInitAttr(qp_type=self.e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap)
        return self.qp_mod.QP(self.pd, init), cq

    def connect_qp(self, qp: Any, psn: int, remote: RdmaEndpointInfo, access: int) -> None:
        """Drive ``qp`` RESET -> INIT -> RTR -> RTS towards ``remote``."""
        attr = self.qp_mod.QPAttr()
        attr.qp_access_flags = access
        attr.pkey_index = 0
        attr.port_num = _PORT
        attr.path_mtu = min(int(self.port_attr.active_mtu), remote.mtu)
        attr.dest_qp_num = remote.qp_num
        attr.rq_psn = remote.psn
        attr.max_dest_rd_atomic = _MAX_RD_ATOMIC
        attr.min_rnr_timer = 12
        route = self.addr_mod.GlobalRoute(
            dgid=self.addr_mod.GID(gid_to_text(remote.gid)), sgid_index=_GID_INDEX
        )
        attr.ah_attr = self.addr_mod.AHAttr(gr=route, is_global=1, dlid=remote.lid, port_num=_PORT)
        attr.sq_psn = psn
        attr.timeout = 14
        attr.retry_cnt = 7
        attr.rnr_retry = 7
        attr.max_rd_atomic = _MAX_RD_ATOMIC
        qp.to_rts(attr)  # pyverbs walks INIT and RTR first with the matching attribute masks

    def local_info(
        self, qp: Any, psn: int, address: int, length: int, rkey: int
    ) -> RdmaEndpointInfo:
        return RdmaEndpointInfo(
            qp_num=int(qp.qp_num),
            psn=psn,
            lid=int(self.port_attr.lid),
            gid=self.gid,
            mtu=int(self.port_attr.active_mtu),
            address=address,
            length=length,
            rkey=rkey,
        )


class RdmaNodeEndpoint:
    """Node side: the arena registered once; one connected QP per client connection."""

    def __init__(self, arena_address: int, arena_size: int) -> None:
        self._verbs = verbs = _Verbs()
        e = verbs.e
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE
        try:
            self._mr = verbs.mr_mod.MR(verbs.pd, arena_size, access, address=arena_address)
        except Exception as exc:
            raise TransportUnavailable(f"cannot register the arena: {exc}") from exc
        self._access = access
        self._address = arena_address
        self._size = arena_size

    def accept(self, client: RdmaEndpointInfo) -> tuple[object, RdmaEndpointInfo]:
        """Create a QP connected to ``client``; returns (a handle to :meth:`drop`, our info)."""
        verbs = self._verbs
        qp, cq = verbs.create_qp()
        psn = secrets.randbelow(1 << 24)
        verbs.connect_qp(qp, psn, client, self._access)
        info = verbs.local_info(qp, psn, self._address, self._size, int(self._mr.rkey))
        return (qp, cq), info

    def drop(self, handle: object) -> None:
        qp, cq = cast(tuple[Any, Any], handle)
        qp.close()
        cq.close()

    def close(self) -> None:
        self._mr.close()


class RdmaClientMemory:
    """Client side :class:`kvstore.transport.base.RemoteMemory` over one RC queue pair."""

    def __init__(self, staging_bytes: int = DEFAULT_STAGING_BYTES) -> None:
        self._verbs = verbs = _Verbs()
        e = verbs.e
        try:
            self._mr = verbs.mr_mod.MR(verbs.pd, staging_bytes, e.IBV_ACCESS_LOCAL_WRITE)
            self._qp, self._cq = verbs.create_qp()
        except Exception as exc:
            raise TransportUnavailable(f"cannot set up an RDMA queue pair: {exc}") from exc
        self._staging = memoryview((ctypes.c_char * staging_bytes).from_address(self._mr.buf))
        self._staging = self._staging.cast("B")
        self._psn = secrets.randbelow(1 << 24)
        self._remote: RdmaEndpointInfo | None = None
        self._wr_ids = 0

    @property
    def kind(self) -> TransportKind:
        return TransportKind.RDMA

    @property
    def writable(self) -> bool:
        return True

    def mapped(self) -> None:
        return None  # the arena is in another host's memory

    def local_info(self) -> RdmaEndpointInfo:
        """What to send in RDMA_CONNECT."""
        return self._verbs.local_info(
            self._qp, self._psn, int(self._mr.buf), self._staging.nbytes, int(self._mr.rkey)
        )

    def connect(self, node: RdmaEndpointInfo) -> None:
        """Finish the connection with the node's RDMA_CONNECT reply."""
        self._verbs.connect_qp(self._qp, self._psn, node, self._verbs.e.IBV_ACCESS_LOCAL_WRITE)
        self._remote = node

    def read_into(
        self,
        spans: Sequence[tuple[int, memoryview]],
        on_copied: Callable[[int], None] | None = None,
    ) -> None:
        index = 0
        for chunk in self._chunks([(offset, t.nbytes) for offset, t in spans]):
            self._post(self._verbs.e.IBV_WR_RDMA_READ, [(o, s, n) for (o, n), s in chunk])
            for (_offset, nbytes), staged in chunk:
                spans[index][1][:] = self._staging[staged : staged + nbytes]
                if on_copied is not None:
                    on_copied(index)
                index += 1

    def write_from(self, spans: Sequence[tuple[int, Sequence[memoryview]]]) -> None:
        sizes = [(offset, sum(p.nbytes for p in parts)) for offset, parts in spans]
        index = 0
        for chunk in self._chunks(sizes):
            for _span, staged in chunk:
                position = staged
                for part in spans[index][1]:
                    self._staging[position : position + part.nbytes] = part
                    position += part.nbytes
                index += 1
            self._post(self._verbs.e.IBV_WR_RDMA_WRITE, [(o, s, n) for (o, n), s in chunk])

    def close(self) -> None:
        self._staging.release()
        self._qp.close()
        self._cq.close()
        self._mr.close()

    def _chunks(self, sizes: Sequence[tuple[int, int]]) -> list[list[tuple[tuple[int, int], int]]]:
        """Group spans so that each group fits the staging buffer; each span gets its staging
        offset. A span larger than the staging buffer cannot be moved (TransportUnavailable)."""
        chunks: list[list[tuple[tuple[int, int], int]]] = [[]]
        used = 0
        for offset, nbytes in sizes:
            if nbytes > self._staging.nbytes:
                raise TransportUnavailable(f"a {nbytes}-byte block exceeds the staging buffer")
            if used + nbytes > self._staging.nbytes or len(chunks[-1]) == _MAX_SEND_WR:
                chunks.append([])
                used = 0
            chunks[-1].append(((offset, nbytes), used))
            used += nbytes
        return [c for c in chunks if c]

    def _post(self, opcode: int, ops: Sequence[tuple[int, int, int]]) -> None:
        """Post one RDMA READ/WRITE per (arena offset, staging offset, length); wait for all."""
        remote = self._remote
        if remote is None:
            raise TransportUnavailable("RDMA queue pair not connected")
        wr_mod, e = self._verbs.wr_mod, self._verbs.e
        base = int(self._mr.buf)
        for arena_offset, staged, nbytes in ops:
            if arena_offset + nbytes > remote.length:
                raise ValueError(f"span [{arena_offset}, +{nbytes}) outside the node's arena")
            self._wr_ids += 1
            sge = wr_mod.SGE(base + staged, nbytes, self._mr.lkey)
            wr = wr_mod.SendWR(
                wr_id=self._wr_ids,
                opcode=opcode,
                num_sge=1,
                sg=[sge],
                send_flags=e.IBV_SEND_SIGNALED,
            )
            wr.set_wr_rdma(remote.rkey, remote.address + arena_offset)
            self._qp.post_send(wr)
        self._wait(len(ops))

    def _wait(self, count: int) -> None:
        deadline = time.monotonic() + _COMPLETION_TIMEOUT_S
        done = 0
        while done < count:
            npolled, wcs = self._cq.poll(count - done)
            for wc in wcs[:npolled]:
                if wc.status != self._verbs.e.IBV_WC_SUCCESS:
                    raise OSError(f"RDMA work request failed with status {wc.status}")
            done += npolled
            if not npolled and time.monotonic() > deadline:
                raise TimeoutError("RDMA completions did not arrive in time")
