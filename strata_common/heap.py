"""Give a process's freed heap back to the system, now and then (glibc only).

A vLLM engine's model-runner process frees and allocates tensors of every size at every step. glibc
keeps what is freed inside its heap for reuse and returns only the top of the heap to the
system, so the process's resident memory creeps up with fragmentation although its live memory
does not: in the 2-hour soak (tests/chaos/test_soak.py) an engine's process tree grew 10-12 %,
and one ``malloc_trim(0)`` returned 270-370 MiB of a 2.3 GiB model runner, whose RSS then stayed
flat. Under a memory limit (a Kubernetes pod's), that creep ends in an OOM kill.

:class:`HeapTrimmer` calls ``malloc_trim(0)`` at most once per interval. The KV connector
(dataplane/connector.py) calls :meth:`HeapTrimmer.maybe_trim` in ``wait_for_save``, when the
step's forward pass is done: no forward pass waits on the allocator's lock, and the trim (3-11 ms
measured) adds to that one step's time once an interval. It does nothing where the allocator is
not glibc's (another one, e.g. tcmalloc or jemalloc, preloaded) or the interval is 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["HeapTrimmer", "TrimResult", "glibc_malloc_trim"]

logger = logging.getLogger("strata_common.heap")

_PAGE = os.sysconf("SC_PAGE_SIZE")
_OTHER_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where malloc is not glibc's (musl, a preloaded one)."""
    if any(name in os.environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATORS):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    result: Callable[[int], int] = trim
    return result


def resident_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


@dataclass(frozen=True, slots=True)
class TrimResult:
    """One trim: the resident memory it returned to the system and how long it took."""

    released_bytes: int
    duration_s: float


class HeapTrimmer:
    """``malloc_trim(0)`` at most once every ``interval_s`` (0: never)."""

    def __init__(
        self,
        interval_s: float,
        *,
        trim: Callable[[int], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rss: Callable[[], int] = resident_bytes,
    ) -> None:
        if interval_s < 0:
            raise ValueError("interval_s must be >= 0")
        self._trim = trim if trim is not None else glibc_malloc_trim()
        self._interval_s = interval_s
        self._clock, self._rss = clock, rss
        self._last = clock()

    @property
    def enabled(self) -> bool:
        return self._trim is not None and self._interval_s > 0

    def maybe_trim(self) -> TrimResult | None:
        """Trim if the interval has passed since the last trim (or the start); else None."""
        if self._trim is None or self._interval_s <= 0:
            return None
        now = self._clock()
        if now - self._last < self._interval_s:
            return None
        before = self._rss()
        t0 = time.perf_counter()
        self._trim(0)
        duration = time.perf_counter() - t0
        self._last = self._clock()
        released = max(0, before - self._rss())
        logger.debug("malloc_trim: %d MiB returned in %.1f ms", released >> 20, duration * 1e3)
        return TrimResult(released, duration)
