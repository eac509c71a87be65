"""Waiting for what a test's processes or tasks do in the background (one helper: a copy per
file drifts). For work with no pass criterion on its speed: the bound only stops a hung test."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wait_until"]


def wait_until(
    condition: Callable[[], bool],
    timeout_s: float = 10.0,
    what: str = "condition",
    *,
    interval_s: float = 0.05,
) -> float:
    """Poll ``condition`` every ``interval_s`` until it holds; the monotonic time it held. An
    AssertionError naming ``what`` once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:g} s"
        time.sleep(interval_s)
    return time.monotonic()
