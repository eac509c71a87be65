"""Child-process helpers shared by the launcher and `strata serve`'s supervisor.

Every process Strata starts runs in its own process group (so one signal reaches an engine's
helper processes too) and dies with its parent (PR_SET_PDEATHSIG), so a killed gateway or
`strata serve` never leaves engines behind.

A process group, not a session: children stay in their parent's session. Linux (with
``CONFIG_SCHED_AUTOGROUP``, on by default) schedules each session as one group, and groups, not
tasks, share a core fairly. When every worker led its own session, a new engine pinned to a core
that a busy engine used got ~2 % of it (measured on a 2-core host: a CPU-bound thread pinned next
to a decoding vLLM engine got 0.05 s of CPU in 3 s), so it took minutes to start and a prefill
engine sharing its core with a busy decode engine stalled for minutes (issue 8). In one session
the kernel shares the core between the tasks (1.5 s of 3 s in the same test).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Collection, Sequence

__all__ = [
    "die_with_parent",
    "killpg_quietly",
    "move_pinned_threads",
    "renice_tree",
    "start_child",
    "with_parent_death_signal",
]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when its parent dies (runs between fork and exec)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def with_parent_death_signal(
    argv: Sequence[str],
) -> tuple[list[str], Callable[[], None] | None]:
    """``(argv, preexec_fn)`` for a child that gets SIGTERM when its parent thread dies.

    Prefers util-linux's ``setpriv --pdeathsig`` (it sets PR_SET_PDEATHSIG, then execs the
    command): no Python code runs in the child between fork and exec, which is unsafe in a
    process with gRPC threads — the gateway launching workers saw its children hang or lose
    their gRPC pollers that way. Without setpriv, falls back to :func:`die_with_parent` as a
    ``preexec_fn``.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "TERM", "--", *argv], None
    return list(argv), die_with_parent


def start_child(
    argv: Sequence[str], env: dict[str, str], *, nice: int = 0
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as a child that leads its own process group in this session (see the
    module docstring), gets SIGTERM when this thread dies, reads nothing, and writes stdout and
    stderr to one pipe. Signal the whole group with ``killpg_quietly(child.pid, sig)``.

    ``nice`` != 0: the child (and what it starts) runs at that niceness, set by coreutils'
    ``nice`` before it execs (a negative one needs CAP_SYS_NICE; without it the child runs at
    this process's niceness and ``nice`` says so on its stderr).
    """
    argv, preexec_fn = with_parent_death_signal(argv)
    if nice and (tool := shutil.which("nice")) is not None:
        argv = [tool, "-n", str(nice), *argv]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        process_group=0,
        preexec_fn=preexec_fn,
    )


def killpg_quietly(pgid: int, sig: int) -> None:
    """Signal a process group that may already be gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def move_pinned_threads(pid: int, old: Collection[int], new: Collection[int]) -> int:
    """Re-pin the threads of process ``pid`` and of its descendants whose CPU affinity is exactly
    ``old`` onto ``new``; returns how many moved.

    An engine's compute threads (vLLM binds its OpenMP threads to VLLM_CPU_OMP_THREADS_BIND) are
    the ones pinned to its cores; threads with any other affinity (unpinned helpers, the gRPC
    server) are left alone. OpenMP binds a thread once, when its team starts, and never checks
    again, so the move holds for the engine's life.
    """
    import psutil

    old_set, new_set = set(old), set(new)
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    moved = 0
    for process in processes:
        try:
            threads = process.threads()
        except psutil.Error:
            continue
        for thread in threads:
            with contextlib.suppress(OSError):  # the thread may be gone by now
                if os.sched_getaffinity(thread.id) == old_set:
                    os.sched_setaffinity(thread.id, new_set)
                    moved += 1
    return moved


def renice_tree(pid: int, nice: int) -> int:
    """Set every thread of process ``pid`` and of its descendants to niceness ``nice`` (Linux
    keeps a niceness per thread); returns how many threads changed."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    changed = 0
    for process in processes:
        try:
            threads = process.threads()
        except psutil.Error:
            continue
        for thread in threads:
            with contextlib.suppress(OSError):
                if os.getpriority(os.PRIO_PROCESS, thread.id) != nice:
                    os.setpriority(os.PRIO_PROCESS, thread.id, nice)
                    changed += 1
    return changed
