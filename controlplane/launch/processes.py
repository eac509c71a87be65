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
    "can_lower_niceness",
    "die_with_parent",
    "killpg_quietly",
    "move_pinned_threads",
    "moved_affinity",
    "renice_tree",
    "start_child",
    "tree_thread_ids",
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


def tree_thread_ids(pid: int) -> list[int]:
    """The thread ids of process ``pid`` and of its descendants (those that exist right now;
    [] when ``pid`` is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    tids: list[int] = []
    for process in processes:
        try:
            tids += [thread.id for thread in process.threads()]
        except psutil.Error:
            continue
    return tids


def moved_affinity(affinity: Collection[int], old: int, new: int) -> set[int] | None:
    """A thread pinned within an engine's cores that holds core ``old``, with ``new`` in its
    place; None for a thread that does not hold ``old`` or is not pinned within the engine's
    cores (``affinity`` spans more than the engine's cores: an unpinned helper)."""
    cores = set(affinity)
    if old not in cores:
        return None
    return (cores - {old}) | {new}


def move_pinned_threads(pid: int, engine_cores: Collection[int], old: int, new: int) -> int:
    """Move the engine whose process is ``pid`` off core ``old`` onto core ``new``: every thread
    of its process tree pinned within ``engine_cores`` that holds ``old`` gets ``new`` instead
    (vLLM binds each OpenMP thread to one of VLLM_CPU_OMP_THREADS_BIND's cores; the threads a
    pinned thread starts inherit its affinity). Threads with a wider affinity (unpinned helpers,
    the gRPC server) are left alone. OpenMP binds a thread once, when its team starts, and never
    checks again, so the move holds for the engine's life. Returns how many threads moved."""
    allowed = set(engine_cores)
    moved = 0
    for tid in tree_thread_ids(pid):
        with contextlib.suppress(OSError):  # the thread may be gone by now
            affinity = os.sched_getaffinity(tid)
            if not affinity <= allowed:
                continue
            target = moved_affinity(affinity, old, new)
            if target is not None:
                os.sched_setaffinity(tid, target)
                moved += 1
    return moved


def renice_tree(pid: int, nice: int) -> int:
    """Set every thread of process ``pid`` and of its descendants to niceness ``nice`` (Linux
    keeps a niceness per thread); returns how many threads changed."""
    changed = 0
    for tid in tree_thread_ids(pid):
        with contextlib.suppress(OSError):
            if os.getpriority(os.PRIO_PROCESS, tid) != nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed += 1
    return changed


def can_lower_niceness(by: int) -> bool:
    """Whether this process may start children ``by`` steps below its own niceness (root, or an
    RLIMIT_NICE that allows it)."""
    if by <= 0 or os.geteuid() == 0:
        return True
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    lowest = 20 - soft  # RLIMIT_NICE is 20 - the lowest niceness allowed
    return os.getpriority(os.PRIO_PROCESS, 0) - by >= lowest
