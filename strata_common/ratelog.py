"""``RateLimitedLog``: at most one log line per kind of event per interval.

For events a peer can cause at will (a malformed frame, an unknown lease id, a refused
connection): logging each one lets a single client flood the log (one 512 KiB RELEASE frame of
unknown ids once wrote 65,536 lines). Each *kind* (a short string chosen by the caller, e.g.
``"RELEASE unknown lease"``) logs its first event, then nothing more until ``interval_s`` has
passed; the next line it logs says how many were suppressed meanwhile. Kinds are few and fixed by
the code (never built from peer data), so the table of kinds stays small.

The clock is injected (``time.monotonic`` by default) so tests are exact. Not thread-safe: each
owner (an event loop) uses its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RateLimitedLog"]


@dataclass(slots=True)
class _Kind:
    last_logged: float
    suppressed: int = 0


class RateLimitedLog:
    """Log through ``logger``, at most once per ``interval_s`` per kind of event."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}
        self.total_suppressed = 0
        """Lines not written, over all kinds (for tests and STATS)."""

    def log(
        self,
        level: int,
        kind: str,
        message: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> bool:
        """Log ``message % args`` (with ``exc_info``'s traceback) unless ``kind`` was logged
        less than ``interval_s`` ago; returns whether a line was written."""
        now = self._clock()
        state = self._kinds.get(kind)
        if state is not None and now - state.last_logged < self.interval_s:
            state.suppressed += 1
            self.total_suppressed += 1
            return False
        suppressed = 0 if state is None else state.suppressed
        self._kinds[kind] = _Kind(now)
        if suppressed:
            message += " (%d more like this since the previous line, not logged)"
            args = (*args, suppressed)
        self._logger.log(level, message, *args, exc_info=exc_info)
        return True

    def warning(self, kind: str, message: str, *args: object) -> bool:
        return self.log(logging.WARNING, kind, message, *args)

    def info(self, kind: str, message: str, *args: object) -> bool:
        return self.log(logging.INFO, kind, message, *args)
