"""Exact tests of OutageLog: a metadata store that stays down is logged a few times, not at
every retry."""

from __future__ import annotations

import logging

import pytest

from kvstore.metadata import OutageLog
from tests.fakes import FakeClock


def test_an_outage_logs_its_start_every_30_s_and_its_end(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(100.0)
    log = OutageLog(logging.getLogger("test.outage"), "heartbeat of A", every_s=30.0, clock=clock)
    caplog.set_level(logging.INFO, "test.outage")
    log.succeeded()  # nothing to say while it works
    for _ in range(4 * 65):  # 4 retries a second for 65 s
        log.failed(ConnectionError("refused"))
        clock.now += 0.25
    log.succeeded()
    log.succeeded()
    lines = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    assert lines == [
        ("ERROR", "heartbeat of A failed; retrying", True),
        ("ERROR", "heartbeat of A still failing after 30s (121 attempts): refused", False),
        ("ERROR", "heartbeat of A still failing after 60s (241 attempts): refused", False),
        ("WARNING", "heartbeat of A works again after 65.0s (260 failed attempts)", False),
    ]
    assert log.failures == 0
    caplog.clear()
    log.failed(TimeoutError("slow"))  # a new outage starts with a traceback again
    assert [(r.getMessage(), r.exc_info is not None) for r in caplog.records] == [
        ("heartbeat of A failed; retrying", True)
    ]
