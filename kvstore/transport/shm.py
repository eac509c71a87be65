"""``ShmMemory``: the shared-memory data path -- the node's arena file mapped by a client on the
same host, attached only when it is provably the node's (boot id, device, inode, size).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvstore.transport.base import TransportKind, TransportUnavailable
from strata_common.host import boot_id

__all__ = ["ShmMemory"]


class ShmMemory:
    """The node's arena file mapped into this process (same host only).

    Mapped read-write when the file can be opened so (PUTs then go through shared memory too),
    else read-only (GETs only). The mapping is made only if the opened file is provably the one
    the node describes in its ``SHM_INFO`` reply: same kernel boot, device, inode and size --
    an address comparison would be fooled by containers, NAT and port forwarding.
    """

    def __init__(self, mapping: mmap.mmap, writable: bool) -> None:
        self._mmap = mapping
        self._view = memoryview(mapping)
        self._writable = writable

    @classmethod
    def attach(cls, info: Mapping[str, Any], local_boot_id: str | None = None) -> ShmMemory:
        """Map the arena described by ``info``; :class:`TransportUnavailable` says why not."""
        local = boot_id() if local_boot_id is None else local_boot_id
        if not local or info.get("boot_id") != local:
            raise TransportUnavailable("the node runs under another kernel (boot id differs)")
        path = str(info.get("path", ""))
        writable = True
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            writable = False
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise TransportUnavailable(f"cannot open the arena file {path!r}: {exc}") from exc
        try:
            stat = os.fstat(fd)
            if (info.get("device"), info.get("inode"), info.get("size")) != (
                stat.st_dev,
                stat.st_ino,
                stat.st_size,
            ):
                raise TransportUnavailable(f"{path!r} is not the node's arena file")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mapping = mmap.mmap(fd, stat.st_size, flags=mmap.MAP_SHARED, prot=prot)
        except OSError as exc:
            raise TransportUnavailable(f"cannot map the arena file {path!r}: {exc}") from exc
        finally:
            os.close(fd)
        return cls(mapping, writable)

    @property
    def kind(self) -> TransportKind:
        return TransportKind.SHM

    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def size(self) -> int:
        return self._view.nbytes

    def mapped(self) -> memoryview:
        return self._view

    def view(self, offset: int, nbytes: int) -> memoryview:
        """A view of arena bytes (zero copy); ValueError if outside the arena."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self._view.nbytes:
            raise ValueError(f"span [{offset}, {offset + nbytes}) outside the arena")
        return self._view[offset : offset + nbytes]

    def read_into(
        self,
        spans: Sequence[tuple[int, memoryview]],
        on_copied: Callable[[int], None] | None = None,
    ) -> None:
        for i, (offset, target) in enumerate(spans):
            target[:] = self.view(offset, target.nbytes)
            if on_copied is not None:
                on_copied(i)

    def write_from(self, spans: Sequence[tuple[int, Sequence[memoryview]]]) -> None:
        if not self._writable:
            raise PermissionError("the arena is mapped read-only")
        for offset, parts in spans:
            position = offset
            for part in parts:
                self.view(position, part.nbytes)[:] = part
                position += part.nbytes

    def close(self) -> None:
        self._view.release()
        self._mmap.close()
