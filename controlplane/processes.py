"""Child-process helpers shared by the launcher and `strata serve`'s supervisor.

Every process Strata starts runs in its own process group (so one signal reaches an engine's
helper processes too) and dies with its parent (PR_SET_PDEATHSIG), so a killed gateway or
`strata serve` never leaves engines behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

__all__ = ["die_with_parent", "killpg_quietly"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when its parent dies (runs between fork and exec)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def killpg_quietly(pgid: int, sig: int) -> None:
    """Signal a process group that may already be gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
