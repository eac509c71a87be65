"""Exact tests of strata_common.ratelog.RateLimitedLog (an injected clock)."""

from __future__ import annotations

import logging

import pytest

from strata_common.ratelog import RateLimitedLog
from tests.fakes import FakeClock


def test_one_line_per_kind_per_interval_then_the_count_of_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    log = RateLimitedLog(logging.getLogger("test.ratelog"), interval_s=10.0, clock=clock)
    caplog.set_level(logging.INFO, "test.ratelog")
    written = [log.warning("RELEASE", "unknown lease %d", i) for i in range(65536)]
    assert written == [True] + [False] * 65535
    assert log.warning("PUT", "bad header") is True  # another kind is not held back
    clock.now += 9.999
    assert log.warning("RELEASE", "unknown lease %d", 7) is False
    clock.now += 0.001
    assert log.info("RELEASE", "unknown lease %d", 8) is True
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "unknown lease 0"),
        (logging.WARNING, "bad header"),
        (
            logging.INFO,
            "unknown lease 8 (65536 more like this since the previous line, not logged)",
        ),
    ]
    assert log.total_suppressed == 65536


def test_exception_tracebacks_and_validation(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RateLimitedLog(logging.getLogger("test.ratelog"), interval_s=1.0, clock=clock)
    caplog.set_level(logging.ERROR, "test.ratelog")
    error = RuntimeError("boom")
    assert log.log(logging.ERROR, "bug", "internal error", exc_info=error)
    assert not log.log(logging.ERROR, "bug", "internal error", exc_info=error)
    (record,) = caplog.records
    assert record.exc_info is not None and record.exc_info[1] is error
    with pytest.raises(ValueError, match="positive"):
        RateLimitedLog(logging.getLogger("x"), interval_s=0)
