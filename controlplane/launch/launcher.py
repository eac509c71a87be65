"""LocalProcessLauncher: starts `strata worker` processes on this host for `strata admin scale`.

Implements :class:`~controlplane.instances.types.Launcher`. Each launch:

1. takes CPU cores for the engine from a :class:`CorePool` (this process's affinity set by default),
   so that two engines never share a core while there are enough cores;
2. reserves a free TCP port: a socket bound to ``HOST:0`` with ``SO_REUSEPORT`` is held open while
   the worker starts. No other process can bind that port meanwhile (a plain ``bind(0)`` never
   picks it, an explicit bind fails, and Linux shares an ``SO_REUSEPORT`` port only among
   processes of the same user), yet the worker, told ``--reuse-port true``, can. The reservation
   is dropped once the worker prints its ready line or exits. This closes the race of "find a
   free port, close it, hope it stays free". (Not ``SO_REUSEADDR``: Linux lets any user's
   ``SO_REUSEADDR`` socket share a port nobody listens on yet, so another user could take the
   port during the engine's load and pose as the worker.)
3. starts ``python -m dataplane.worker --role R --model DIR --store HOST:PORT --host H --port P``
   with ``VLLM_CPU_OMP_THREADS_BIND`` set to the engine's cores, in its own session (so its whole
   process group, vLLM's engine-core process included, can be signalled at once) and with
   ``PR_SET_PDEATHSIG`` = SIGTERM, so even a ``kill -9`` of the gateway takes its workers down;
4. returns at once with the endpoint; the registry then polls the worker's Health until ready
   (engine start-up takes ~20 s for the tiny model on CPU).

``stop()`` sends SIGTERM to the worker (it drains, then stops its engine), waits ``timeout_s``,
then SIGKILLs what is left of its process group and reaps the worker; its cores go back to the
pool. ``close()`` stops every worker.

More engines than cores (e.g. 2 prefill + 2 decode on this 2-core machine): with
``share_cores=True`` (the default) a launch that finds no free core takes the core(s) shared by
the fewest engines (lowest id first) and logs a warning; pinned engines sharing a core each get a
fraction of it, so token latency grows roughly with the number of engines on it (measured
2-core figures: ../shared/notes/vllm-cpu.md). With ``share_cores=False`` such a launch raises
:class:`~controlplane.instances.types.InstanceConflict` (FAILED_PRECONDITION on the admin API). When
a worker stops and frees a core while another core is still shared, the newest ready engine on
the shared core moves to the free one: its pinned threads are re-pinned in place
(:func:`~controlplane.launch.processes.move_pinned_threads`), so no core sits idle while two engines
share one.

The process-group and ``PR_SET_PDEATHSIG`` handling mirrors ``strata/supervisor.py`` (which
`strata serve` uses); controlplane may not import the ``strata`` package (controlplane/README.md),
so the few lines are restated here. PR_SET_PDEATHSIG fires when the *thread* that forked the child
exits, so :meth:`LocalProcessLauncher.launch` forks from the event loop's own thread, never from a
short-lived executor thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from controlplane.instances.supervision import RestartPolicy
from controlplane.instances.types import InstanceConflict
from controlplane.launch.processes import (
    can_lower_niceness,
    killpg_quietly,
    move_pinned_threads,
    renice_tree,
    start_child,
)
from controlplane.workers.roles import WorkerRole
from kvstore.metadata import parse_metadata_spec
from strata_common.endpoints import parse_endpoint
from strata_common.options import option
from strata_common.secrets import scrubbed_environment
from strata_common.units import parse_duration

__all__ = [
    "CorePool",
    "LaunchConfig",
    "LocalLauncherConfig",
    "LocalProcessLauncher",
    "LocalWorker",
]

logger = logging.getLogger(__name__)

READY_LINE = "strata worker ready"
"""What `strata worker` prints once its gRPC server listens (dataplane/worker.py)."""
_TAIL_LINES = 40


# -- cores -----------------------------------------------------------------------------------


class CorePool:
    """Hands out CPU cores to engines: free cores first; when none are left, the cores shared
    by the fewest engines (or a refusal when sharing is off). One owner: the launcher."""

    def __init__(self, cpus: Iterable[int], *, share_cores: bool) -> None:
        self._users: dict[int, int] = {cpu: 0 for cpu in sorted(set(cpus))}
        if not self._users:
            raise ValueError("the core pool is empty")
        self.share_cores = share_cores

    @property
    def cpus(self) -> tuple[int, ...]:
        return tuple(self._users)

    def users(self, cpu: int) -> int:
        """How many engines hold ``cpu`` now."""
        return self._users[cpu]

    def allocate(self, num_cores: int) -> tuple[int, ...]:
        """``num_cores`` distinct cores, least-used first (ties: lowest id)."""
        if not 1 <= num_cores <= len(self._users):
            raise ValueError(f"num_cores must be in [1, {len(self._users)}], got {num_cores}")
        chosen = sorted(self._users, key=lambda cpu: (self._users[cpu], cpu))[:num_cores]
        if any(self._users[cpu] > 0 for cpu in chosen):
            if not self.share_cores:
                raise InstanceConflict(
                    f"no free cores for another engine ({len(self._users)} cores, all taken; "
                    "the launcher does not share cores)"
                )
            logger.warning(
                "launcher: more engines than cores; cores %s are now shared (%s engines each)",
                chosen,
                [self._users[cpu] + 1 for cpu in chosen],
            )
        for cpu in chosen:
            self._users[cpu] += 1
        return tuple(sorted(chosen))

    def release(self, cores: Iterable[int]) -> None:
        cores = tuple(cores)
        for cpu in cores:
            if self._users.get(cpu, 0) <= 0:
                raise ValueError(f"core {cpu} is not allocated")
        for cpu in cores:
            self._users[cpu] -= 1

    def move(self, old: int, new: int) -> None:
        """One engine leaves core ``old`` (which it held) for core ``new``."""
        if self._users.get(old, 0) <= 0:
            raise ValueError(f"core {old} is not allocated")
        if new not in self._users:
            raise ValueError(f"core {new} is not in the pool")
        self._users[old] -= 1
        self._users[new] += 1

    def rebalance_move(self, holdings: Sequence[tuple[int, ...]]) -> tuple[int, int, int] | None:
        """The next move that spreads engines out: ``(engine index, old core, new core)`` for
        the newest engine (last in ``holdings``, each engine's cores) on a core shared with
        another engine while some core is free; None when no core is free or none is shared."""
        free = [cpu for cpu, users in self._users.items() if users == 0]
        if not free:
            return None
        for index in range(len(holdings) - 1, -1, -1):
            for cpu in holdings[index]:
                if self._users[cpu] >= 2:
                    return index, cpu, free[0]
        return None


# -- config ----------------------------------------------------------------------------------


def parse_cpus(text: str) -> tuple[int, ...]:
    """``"0,1,4-7"`` → ``(0, 1, 4, 5, 6, 7)``."""
    cpus: list[int] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"invalid core list {text!r}: expected e.g. '0,1' or '0-3'")
        cpus += range(int(first), int(last if sep else first) + 1)
    return tuple(sorted(set(cpus)))


def _parse_worker_args(text: str) -> tuple[str, ...]:
    return tuple(shlex.split(text))


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """The gateway's launcher settings (its ``--launch-*`` flags): off unless ``store`` is set."""

    store: str = option(
        "", metavar="HOST:PORT", help="store node HOST:PORT of the launched workers (enables)"
    )
    prefill: int = option(0, help="prefill workers to launch at start-up")
    decode: int = option(0, help="decode workers to launch at start-up")
    kv_metadata: str = option("", help="the launched workers' --kv-metadata (strata://HOST:PORT)")
    kv_cache_size: str = option("1GiB", help="the launched workers' --kv-cache-size")
    max_model_len: int | None = option(None, help="the launched workers' --max-model-len")
    worker_args: tuple[str, ...] = option(
        (), parse=_parse_worker_args, help='more worker arguments, e.g. "--max-num-seqs 8"'
    )
    cores_per_engine: int = option(1, help="CPU cores each launched engine is pinned to")
    cpus: tuple[int, ...] | None = option(
        None, parse=parse_cpus, help="core list, e.g. 0-3 (none = this process's affinity set)"
    )
    log_dir: Path | None = option(
        None, help="launched workers' output goes to LOG_DIR/{role}-{port}.log (none = stdout)"
    )
    restart: bool = option(
        True,
        help="replace a launched worker that stops serving once the gateway serves (exited, "
        "unreachable, stalled); off = leave it dead",
    )
    restart_grace_s: float = option(
        10.0,
        parse=parse_duration,
        help="a launched worker dead while its process lives is replaced after this long dead",
    )
    restart_backoff_s: float = option(
        1.0, parse=parse_duration, help="wait before a replacement; doubles per quick failure"
    )
    restart_backoff_max_s: float = option(60.0, parse=parse_duration, help="longest back-off")
    restart_reset_after_s: float = option(
        60.0,
        parse=parse_duration,
        help="a worker ready this long, then failing, is a new incident (back-off, limit reset)",
    )
    restart_limit: int = option(
        5,
        help="quick restarts of one worker slot (none served --launch-restart-reset-after) "
        "within the window before it is left dead (crash loop)",
    )
    restart_window_s: float = option(
        600.0, parse=parse_duration, help="the window of --launch-restart-limit"
    )
    standby: int = option(
        0,
        help="workers of each role kept started in reserve once the pool is ready: scale, "
        "set-role and restarts take one (seconds instead of an engine start); each holds an "
        "engine's memory and cores (controlplane/launch/standby.py)",
    )

    def __post_init__(self) -> None:
        if self.store:
            parse_endpoint(self.store)
        for name in ("prefill", "decode"):
            count = getattr(self, name)
            if count < 0:
                raise ValueError(f"launch_{name} must be >= 0, got {count}")
            if count and not self.store:
                raise ValueError(
                    f"launch_{name} needs launch_store (the launched workers' store node)"
                )
        if self.kv_metadata:
            parse_metadata_spec(self.kv_metadata)
        if self.cores_per_engine < 1:
            raise ValueError(f"launch_cores_per_engine must be >= 1, got {self.cores_per_engine}")
        if self.standby < 0:
            raise ValueError(f"launch_standby must be >= 0, got {self.standby}")
        if self.standby and not self.store:
            raise ValueError("launch_standby needs launch_store (the launched workers' store node)")
        if self.cpus is not None and (not self.cpus or any(cpu < 0 for cpu in self.cpus)):
            raise ValueError(f"launch_cpus must be non-negative core ids, got {self.cpus}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"launch_max_model_len must be >= 2, got {self.max_model_len}")
        self.restart_policy()  # validates the restart settings

    def restart_policy(self) -> RestartPolicy | None:
        """The registry's policy for launched workers that stop serving (None: restart off)."""
        policy = RestartPolicy(
            grace_s=self.restart_grace_s,
            backoff_s=self.restart_backoff_s,
            backoff_max_s=self.restart_backoff_max_s,
            reset_after_s=self.restart_reset_after_s,
            limit=self.restart_limit,
            window_s=self.restart_window_s,
        )
        return policy if self.restart else None

    @property
    def enabled(self) -> bool:
        """True when the gateway can start workers (`scale`, `set-role`, prefill/decode)."""
        return bool(self.store)

    def launcher_config(
        self, model_dir: Path, cluster_key_file: Path | None = None
    ) -> LocalLauncherConfig:
        """The :class:`LocalProcessLauncher`'s config for workers serving ``model_dir`` (with
        the gateway's ``cluster_key_file``, if it has one)."""
        extra = list(self.worker_args)
        if self.kv_metadata:
            extra = ["--kv-metadata", self.kv_metadata, *extra]
        return LocalLauncherConfig(
            model_dir=model_dir,
            store_endpoint=self.store,
            kv_cache_size=self.kv_cache_size,
            max_model_len=self.max_model_len,
            extra_args=tuple(extra),
            cores_per_engine=self.cores_per_engine,
            cpus=self.cpus,
            log_dir=self.log_dir,
            cluster_key_file=cluster_key_file,
        )


@dataclass(frozen=True, slots=True)
class LocalLauncherConfig:
    """How launched workers are started; validated on construction."""

    model_dir: Path
    store_endpoint: str
    """The KV store node the workers' connectors use (HOST:PORT)."""
    host: str = "127.0.0.1"
    """Interface the workers listen on (and the host part of their endpoints)."""
    kv_cache_size: str = "1GiB"
    max_model_len: int | None = None
    extra_args: tuple[str, ...] = ()
    """More `strata worker` arguments, e.g. ("--max-num-seqs", "8", "--kv-metadata", URL)."""
    cores_per_engine: int = 1
    cpus: tuple[int, ...] | None = None
    """The core pool; None = this process's CPU affinity set."""
    share_cores: bool = True
    """When no core is free: share the least-used one (True) or refuse the launch (False)."""
    python: str = sys.executable
    log_dir: Path | None = None
    """Each worker's output goes to LOG_DIR/{role}-{port}.log; None = this process's stdout,
    every line prefixed with ``[{role}-{port}]``."""
    stop_timeout_s: float = 20.0
    """SIGTERM → SIGKILL grace used by :meth:`LocalProcessLauncher.close`."""
    cluster_key_file: Path | None = None
    """Each worker's ``--cluster-key-file`` (the path, never the key): it then answers only the
    gateway and publishes its HBM events as itself (docs/design/security.md §5.1)."""
    startup_nice: int = -5
    """Niceness of a worker relative to this process until it is ready, then this process's
    own: starting an engine is three Python interpreters importing torch and vLLM (~25 s of CPU
    for the tiny model here), and on a host whose cores serve requests it would otherwise get a
    third of a core; at -5 it gets about three times a serving task's share for those seconds.
    0 = no boost (and where this process may not lower niceness, workers start at its own and
    the launcher says so once)."""

    def __post_init__(self) -> None:
        if not (self.model_dir / "config.json").is_file():
            raise ValueError(f"model directory {self.model_dir} has no config.json")
        parse_endpoint(self.store_endpoint)
        if self.cores_per_engine < 1:
            raise ValueError(f"cores_per_engine must be ≥ 1, got {self.cores_per_engine}")
        if self.cpus is not None and not self.cpus:
            raise ValueError("cpus must not be empty")
        if self.stop_timeout_s < 0:
            raise ValueError(f"stop_timeout_s must be ≥ 0, got {self.stop_timeout_s}")
        if not -20 <= self.startup_nice <= 19:
            raise ValueError(f"startup_nice must be in [-20, 19], got {self.startup_nice}")


# -- one worker ------------------------------------------------------------------------------


def _reserve_port(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, 0))
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(eq=False)
class LocalWorker:
    """A `strata worker` process this launcher started (implements LaunchedWorker)."""

    name: str
    role: WorkerRole
    endpoint: str
    cores: tuple[int, ...]
    proc: subprocess.Popen[bytes]
    _reservation: socket.socket | None
    _on_stopped: Callable[[LocalWorker], None]
    _log: IO[str] | None = None
    _serving_nice: int | None = None
    """Niceness to return to once ready (None: it started at the serving niceness)."""
    _on_ready: Callable[[], None] | None = None
    standby: bool = False
    """Held in reserve (controlplane/launch/standby.py): no gateway uses it yet, so when cores
    free up a serving engine moves to them first."""
    _tail: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopped: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def tail(self) -> tuple[str, ...]:
        """The worker's last output lines (for error messages)."""
        return tuple(self._tail)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def printed_ready(self) -> bool:
        """True once the worker printed its ready line (its gRPC server listens)."""
        return self._ready.is_set()

    def _release_port(self) -> None:
        with self._lock:
            sock, self._reservation = self._reservation, None
        if sock is not None:
            sock.close()

    def _pump(self) -> None:
        """Reads the worker's output (a full pipe would block it), forwards it, watches for
        the ready line; drops the port reservation once the worker listens or exits."""
        assert self.proc.stdout is not None
        try:
            for raw in iter(self.proc.stdout.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self._tail = [*self._tail[-(_TAIL_LINES - 1) :], line]
                with contextlib.suppress(BrokenPipeError, ValueError, OSError):
                    if self._log is not None:
                        self._log.write(line + "\n")
                        self._log.flush()
                    else:
                        sys.stdout.write(f"[{self.name}] {line}\n")
                        sys.stdout.flush()
                if not self._ready.is_set() and READY_LINE in line:
                    self._ready.set()
                    self._release_port()
                    self._became_ready()
        finally:
            self._release_port()
            self.proc.stdout.close()

    def _became_ready(self) -> None:
        """On the pump thread: back to the serving niceness, then tell the launcher (which may
        move engines onto cores that freed up while this one started)."""
        try:
            if self._serving_nice is not None:
                renice_tree(self.proc.pid, self._serving_nice)
            if self._on_ready is not None:
                self._on_ready()
        except Exception:  # the pump must go on reading the worker's output
            logger.exception("launcher: %s: after ready", self.name)

    def _stop_blocking(self, timeout_s: float) -> None:
        pgid = self.proc.pid  # the worker leads its own process group (start_child)
        if self.proc.poll() is None:
            # The worker alone: it drains, then shuts its engine down itself. (SIGTERM to the
            # group stopped vLLM's engine core at once, under the worker's drain: its requests
            # still in flight failed, and its AsyncLLM logged EngineDeadError.)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout_s)
        # Whatever is left in the group (the worker or vLLM's engine core) is killed outright.
        killpg_quietly(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    async def stop(self, *, timeout_s: float) -> None:
        """SIGTERM to the worker, SIGKILL to its process group after ``timeout_s``; on return the
        worker is reaped and its cores are back in the pool. Idempotent."""
        if self._stopped:
            return
        await asyncio.to_thread(self._stop_blocking, timeout_s)
        self._release_port()
        if not self._stopped:
            self._stopped = True
            if self._log is not None:
                self._log.close()
            self._on_stopped(self)


# -- the launcher ----------------------------------------------------------------------------


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Run ``callback`` on ``loop``'s thread (from another thread); nothing if it closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


class LocalProcessLauncher:
    """Starts and stops `strata worker` processes on this host (implements Launcher)."""

    def __init__(self, config: LocalLauncherConfig) -> None:
        self.config = config
        cpus = config.cpus if config.cpus is not None else tuple(os.sched_getaffinity(0))
        self.cores = CorePool(cpus, share_cores=config.share_cores)
        if config.cores_per_engine > len(self.cores.cpus):
            raise ValueError(
                f"cores_per_engine={config.cores_per_engine} but the pool has "
                f"{len(self.cores.cpus)} cores"
            )
        self._workers: list[LocalWorker] = []
        self._closed = False
        self._startup_nice = 0
        if config.startup_nice < 0 and not can_lower_niceness(-config.startup_nice):
            logger.warning(
                "launcher: may not lower niceness by %d (not root, RLIMIT_NICE too low): "
                "workers start without a priority boost",
                -config.startup_nice,
            )
        else:
            self._startup_nice = config.startup_nice

    @property
    def workers(self) -> tuple[LocalWorker, ...]:
        """Workers started and not yet stopped."""
        return tuple(self._workers)

    def _argv(self, role: WorkerRole, port: int) -> list[str]:
        cfg = self.config
        argv = [cfg.python, "-m", "dataplane.worker", "--role", role.name.lower()]
        argv += ["--model", str(cfg.model_dir), "--store", cfg.store_endpoint]
        argv += ["--host", cfg.host, "--port", str(port), "--kv-cache-size", cfg.kv_cache_size]
        argv += ["--reuse-port", "true"]  # the port this launcher holds reserved for it
        if cfg.max_model_len is not None:
            argv += ["--max-model-len", str(cfg.max_model_len)]
        if cfg.cluster_key_file is not None:
            argv += ["--cluster-key-file", str(cfg.cluster_key_file)]
        return [*argv, *cfg.extra_args]

    async def launch(self, role: WorkerRole, *, standby: bool = False) -> LocalWorker:
        """Start a worker of ``role``. ``standby``: one held in reserve, started without the
        start-up priority boost (it must not take CPU from serving engines)."""
        if self._closed:
            raise InstanceConflict("the launcher is closed")
        if role is WorkerRole.UNSPECIFIED:
            raise ValueError("launch needs a role")
        cfg = self.config
        cores = self.cores.allocate(cfg.cores_per_engine)
        reservation: socket.socket | None = None
        log: IO[str] | None = None
        try:
            reservation = _reserve_port(cfg.host)
            port = int(reservation.getsockname()[1])
            name = f"{role.name.lower()}-{port}"
            if cfg.log_dir is not None:
                cfg.log_dir.mkdir(parents=True, exist_ok=True)
                log = open(cfg.log_dir / f"{name}.log", "a", encoding="utf-8")  # noqa: SIM115
            # Its own configuration (STRATA_WORKER_*) and the runtime's, never the gateway's
            # secrets (the admin token, a registry password): strata_common/secrets.py.
            env = scrubbed_environment(
                os.environ,
                prefixes=("STRATA_WORKER_",),
                extra={
                    "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
                    "PYTHONUNBUFFERED": "1",
                },
            )
            # Forked from this (the event loop's) thread: PR_SET_PDEATHSIG follows the thread.
            nice = 0 if standby else self._startup_nice
            proc = start_child(self._argv(role, port), env, nice=nice)
        except BaseException:
            self.cores.release(cores)
            if reservation is not None:
                reservation.close()
            if log is not None:
                log.close()
            raise
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        worker = LocalWorker(
            name=name,
            role=role,
            endpoint=f"{host}:{port}",
            cores=cores,
            proc=proc,
            _reservation=reservation,
            _on_stopped=self._forget,
            _log=log,
            _serving_nice=os.getpriority(os.PRIO_PROCESS, 0) if nice else None,
            _on_ready=functools.partial(_call_soon, asyncio.get_running_loop(), self.rebalance),
            standby=standby,
        )
        threading.Thread(target=worker._pump, name=f"launcher-{name}", daemon=True).start()
        self._workers.append(worker)
        logger.info(
            "launcher: started %s%s worker pid %d on %s, cores %s",
            "standby " if standby else "",
            role.name.lower(),
            proc.pid,
            worker.endpoint,
            cores,
        )
        return worker

    def _forget(self, worker: LocalWorker) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
            self.cores.release(worker.cores)
            self.rebalance()

    def rebalance(self) -> None:
        """Spread the running engines over the cores again (after a worker stopped, or became
        ready): while a core is free and another is shared, the newest ready engine on a shared
        core moves to the free one (its pinned threads are re-pinned in place; nothing
        restarts)."""
        while not self._closed:
            # A worker still starting has not bound its threads yet (it would bind them to the
            # cores in its environment): only ready ones move.
            workers = [w for w in self._workers if w.alive() and w.printed_ready()]
            # The newest engine moves (last in the list): serving engines before standbys.
            workers.sort(key=lambda w: not w.standby)
            move = self.cores.rebalance_move([w.cores for w in workers])
            if move is None:
                return
            index, old, new = move
            worker = workers[index]
            new_cores = tuple(sorted({*worker.cores} - {old} | {new}))
            moved = move_pinned_threads(worker.pid, worker.cores, old, new)
            if moved == 0:
                logger.warning(
                    "launcher: %s: no thread of its engine holds core %d; left on cores %s",
                    worker.name,
                    old,
                    worker.cores,
                )
                return
            self.cores.move(old, new)
            logger.info(
                "launcher: %s moved from cores %s to %s (%d pinned threads re-pinned)",
                worker.name,
                worker.cores,
                new_cores,
                moved,
            )
            worker.cores = new_cores

    async def close(self) -> None:
        """Stop every worker this launcher started (in parallel); later launches are refused."""
        self._closed = True
        await asyncio.gather(
            *(w.stop(timeout_s=self.config.stop_timeout_s) for w in list(self._workers))
        )
