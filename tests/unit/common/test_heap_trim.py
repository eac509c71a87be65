"""strata_common/heap.py: heap trims, at most one per interval."""

from __future__ import annotations

import pytest

from strata_common.heap import HeapTrimmer, glibc_malloc_trim, resident_bytes
from tests.fakes import FakeClock


def test_trims_once_per_interval_and_reports_what_it_returned() -> None:
    clock, calls, rss = FakeClock(100.0), [], iter([900, 600, 700, 650])

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    heap = HeapTrimmer(60.0, trim=trim, clock=clock, rss=lambda: next(rss))
    assert heap.enabled
    assert heap.maybe_trim() is None  # the interval counts from the start
    clock.now += 59.9
    assert heap.maybe_trim() is None
    clock.now += 0.1
    first = heap.maybe_trim()
    assert first is not None and first.released_bytes == 300 and calls == [0]
    clock.now += 30
    assert heap.maybe_trim() is None
    clock.now += 30
    second = heap.maybe_trim()
    assert second is not None and second.released_bytes == 50 and calls == [0, 0]


def test_a_trim_that_returned_nothing_reports_zero() -> None:
    clock, rss = FakeClock(100.0), iter([500, 520])
    heap = HeapTrimmer(1.0, trim=lambda pad: 0, clock=clock, rss=lambda: next(rss))
    clock.now += 1
    result = heap.maybe_trim()
    assert result is not None and result.released_bytes == 0


def test_interval_zero_never_trims() -> None:
    clock = FakeClock(100.0)
    heap = HeapTrimmer(0.0, trim=lambda pad: pytest.fail("trimmed"), clock=clock)
    assert not heap.enabled
    clock.now += 1e6
    assert heap.maybe_trim() is None
    with pytest.raises(ValueError, match="interval_s"):
        HeapTrimmer(-1.0)


def test_another_allocator_preloaded_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert glibc_malloc_trim() is None
    assert not HeapTrimmer(60.0).enabled


def test_glibc_trim_runs_in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    trim = glibc_malloc_trim()
    assert trim is not None  # the test hosts run glibc
    garbage = [bytearray(64 * 1024) for _ in range(512)]  # 32 MiB on the heap, then freed
    del garbage
    assert trim(0) in (0, 1)
    assert resident_bytes() > 0
