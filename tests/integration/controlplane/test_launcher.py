"""LocalProcessLauncher with real processes.

Most tests run a stand-in worker (a shell script given as the launcher's `python`, test code only)
that prints the argv and the core binding it got, starts a child in its process group, prints the
ready line and waits, so process handling is checked in a second per test. One test launches a real
`strata worker` on the tiny model: Health says ready with the right role, and stop() leaves no
process (vLLM's engine core included)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.instances.types import InstanceConflict
from controlplane.launch.launcher import LocalLauncherConfig, LocalProcessLauncher, LocalWorker
from controlplane.workers.client import WorkerClient, WorkerError
from controlplane.workers.roles import WorkerRole
from tests.conftest import REPO_ROOT
from tests.proc_tree import descendants, wait_gone


def wait_for(predicate: object, timeout_s: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- the stand-in worker ---------------------------------------------------------------------

STAND_IN = """\
#!/bin/bash
# Stand-in for `python -m dataplane.worker ARGS` (test double): argv is
# -m dataplane.worker --role R --model M --store S --host H --port P ...
echo "argv: $*"
echo "bind: $VLLM_CPU_OMP_THREADS_BIND"
{ignore}taskset -c "$VLLM_CPU_OMP_THREADS_BIND" sleep 600 &  # pinned like an engine's threads
child=$!
{trap}
{delay}echo "strata worker ready role=$4 listening on ${{10}}:${{12}}"
wait
"""


def stand_in(
    tmp_path: Path, *, ignore_sigterm: bool = False, ready_delay_s: float = 0.0
) -> LocalLauncherConfig:
    script = tmp_path / "stand_in_worker.sh"
    # Like a real worker, the stand-in stops its child on SIGTERM (unless told to ignore it).
    # Ignored signals stay ignored across fork and exec: then neither process dies of SIGTERM.
    ignore = "trap '' TERM\n" if ignore_sigterm else ""
    trap = "" if ignore_sigterm else "trap 'kill $child; exit 143' TERM"
    delay = f"sleep {ready_delay_s}\n" if ready_delay_s else ""
    script.write_text(STAND_IN.format(ignore=ignore, trap=trap, delay=delay))
    script.chmod(0o755)
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return LocalLauncherConfig(
        model_dir=model,
        store_endpoint="127.0.0.1:1",
        python=str(script),
        cpus=(0, 1),
        log_dir=tmp_path / "logs",
        stop_timeout_s=5.0,
    )


def log_lines(worker: LocalWorker, prefix: str) -> list[str]:
    wait_for(worker.printed_ready)
    return [line.removeprefix(prefix) for line in worker.tail if line.startswith(prefix)]


def test_launch_passes_role_model_store_port_and_pins_cores(tmp_path: Path) -> None:
    config = stand_in(tmp_path)

    async def scenario() -> None:
        launcher = LocalProcessLauncher(config)
        try:
            workers = [
                await launcher.launch(role)
                for role in (WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.DECODE)
            ]
            assert [w.cores for w in workers] == [(0,), (1,), (0,)]  # third shares core 0
            assert [launcher.cores.users(c) for c in (0, 1)] == [2, 1]
            for w in workers:
                port = int(w.endpoint.rsplit(":", 1)[1])
                assert w.endpoint == f"127.0.0.1:{port}"
                assert log_lines(w, "argv: ") == [
                    f"-m dataplane.worker --role {w.role.name.lower()} --model {config.model_dir} "
                    f"--store 127.0.0.1:1 --host 127.0.0.1 --port {port} --kv-cache-size 1GiB "
                    "--reuse-port true"
                ]
                assert log_lines(w, "bind: ") == [",".join(map(str, w.cores))]
                log = (tmp_path / "logs" / f"{w.name}.log").read_text()
                assert f"listening on 127.0.0.1:{port}" in log
            assert len({w.endpoint for w in workers}) == 3
            await workers[0].stop(timeout_s=5)
            assert [launcher.cores.users(c) for c in (0, 1)] == [1, 1]
            assert launcher.workers == (workers[1], workers[2])
        finally:
            await launcher.close()
        assert launcher.workers == ()
        assert [launcher.cores.users(c) for c in (0, 1)] == [0, 0]

    asyncio.run(scenario())


def test_a_freed_core_goes_to_an_engine_that_shared_one(tmp_path: Path) -> None:
    """Three engines on two cores: when the one alone on its core stops, the newest engine on
    the shared core moves there — its pinned process is re-pinned in place, the unpinned
    stand-in shell is left alone."""
    config = stand_in(tmp_path)

    async def scenario() -> None:
        launcher = LocalProcessLauncher(config)
        try:
            workers = [
                await launcher.launch(role)
                for role in (WorkerRole.PREFILL, WorkerRole.DECODE, WorkerRole.DECODE)
            ]
            for w in workers:
                await asyncio.to_thread(wait_for, w.printed_ready)
            pinned = {}
            for w in workers:
                (child,) = descendants(w.pid)
                await asyncio.to_thread(
                    wait_for, lambda c=child, w=w: os.sched_getaffinity(c) == set(w.cores)
                )
                pinned[w.name] = child
            shell_affinity = os.sched_getaffinity(workers[2].pid)
            assert [w.cores for w in workers] == [(0,), (1,), (0,)]
            await workers[1].stop(timeout_s=5)
            assert [w.cores for w in (workers[0], workers[2])] == [(0,), (1,)]
            assert [launcher.cores.users(c) for c in (0, 1)] == [1, 1]
            assert os.sched_getaffinity(pinned[workers[2].name]) == {1}
            assert os.sched_getaffinity(pinned[workers[0].name]) == {0}
            assert os.sched_getaffinity(workers[2].pid) == shell_affinity
        finally:
            await launcher.close()
        assert [launcher.cores.users(c) for c in (0, 1)] == [0, 0]

    asyncio.run(scenario())


def test_the_port_is_reserved_until_the_worker_is_ready(tmp_path: Path) -> None:
    # A stand-in that takes a while to get ready: its port must stay reserved meanwhile.
    config = stand_in(tmp_path, ready_delay_s=2.0)

    async def scenario() -> None:
        launcher = LocalProcessLauncher(config)
        try:
            worker = await launcher.launch(WorkerRole.DECODE)
            port = int(worker.endpoint.rsplit(":", 1)[1])
            with socket.socket() as other, pytest.raises(OSError):
                other.bind(("127.0.0.1", port))  # reserved: a plain bind is refused
            await asyncio.to_thread(wait_for, worker.printed_ready)
            with socket.socket() as other:
                other.bind(("127.0.0.1", port))  # released once ready
        finally:
            await launcher.close()

    asyncio.run(scenario())


def test_stop_kills_the_whole_process_group_even_if_sigterm_is_ignored(tmp_path: Path) -> None:
    config = stand_in(tmp_path, ignore_sigterm=True)

    async def scenario() -> None:
        launcher = LocalProcessLauncher(config)
        worker = await launcher.launch(WorkerRole.PREFILL)
        await asyncio.to_thread(wait_for, worker.printed_ready)
        procs = descendants(worker.pid) | {worker.pid}
        assert len(procs) == 2  # the stand-in and its sleeping child
        await worker.stop(timeout_s=0.5)
        assert not worker.alive()
        assert worker.proc.returncode == -signal.SIGKILL
        assert wait_gone(procs) == []
        await worker.stop(timeout_s=0.5)  # idempotent
        await launcher.close()

    asyncio.run(scenario())


def test_close_stops_everything_and_refuses_later_launches(tmp_path: Path) -> None:
    config = stand_in(tmp_path)

    async def scenario() -> set[int]:
        launcher = LocalProcessLauncher(config)
        workers = [await launcher.launch(WorkerRole.DECODE) for _ in range(2)]
        await asyncio.to_thread(lambda: [wait_for(w.printed_ready) for w in workers])
        procs = set().union(*(descendants(w.pid) | {w.pid} for w in workers))
        await launcher.close()
        with pytest.raises(InstanceConflict, match="closed"):
            await launcher.launch(WorkerRole.DECODE)
        return procs

    procs = asyncio.run(scenario())
    assert len(procs) == 4
    assert wait_gone(procs) == []


def test_without_core_sharing_a_launch_beyond_the_pool_is_refused(tmp_path: Path) -> None:
    base = stand_in(tmp_path)
    config = LocalLauncherConfig(
        model_dir=base.model_dir,
        store_endpoint=base.store_endpoint,
        python=base.python,
        cpus=(0, 1),
        share_cores=False,
        log_dir=base.log_dir,
    )

    async def scenario() -> None:
        launcher = LocalProcessLauncher(config)
        try:
            await launcher.launch(WorkerRole.PREFILL)
            await launcher.launch(WorkerRole.DECODE)
            with pytest.raises(InstanceConflict, match="no free cores"):
                await launcher.launch(WorkerRole.DECODE)
            assert len(launcher.workers) == 2
        finally:
            await launcher.close()

    asyncio.run(scenario())


DIES_WITH_PARENT = """\
import asyncio, sys
from pathlib import Path
from controlplane.workers.roles import WorkerRole
from controlplane.launch.launcher import LocalLauncherConfig, LocalProcessLauncher

async def main() -> None:
    config = LocalLauncherConfig(
        model_dir=Path(sys.argv[1]), store_endpoint="127.0.0.1:1", python=sys.argv[2], cpus=(0,),
        log_dir=Path(sys.argv[3]),
    )
    worker = await LocalProcessLauncher(config).launch(WorkerRole.DECODE)
    print(worker.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_workers_die_with_a_killed_gateway(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: kill -9 of the launching process still takes its worker down."""
    config = stand_in(tmp_path)
    gateway = subprocess.Popen(
        [sys.executable, "-c", DIES_WITH_PARENT, str(config.model_dir), config.python,
         str(config.log_dir)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert gateway.stdout is not None
        worker_pid = int(gateway.stdout.readline())
        wait_for(lambda: len(descendants(worker_pid)) == 1)
        procs = descendants(worker_pid) | {worker_pid}
    finally:
        gateway.kill()
        gateway.wait()
    # PR_SET_PDEATHSIG sends SIGTERM to the worker, which stops its own children (a real
    # worker shuts its engine down; the stand-in kills its child).
    try:
        assert wait_gone(procs) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker_pid, signal.SIGKILL)  # leave nothing behind when it failed


# -- a real worker ---------------------------------------------------------------------------


@pytest.fixture
def store_node(tmp_path: Path) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore.server", "--host", "127.0.0.1", "--port", "0",
         "--arena-size", "64MiB"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    endpoint = ""
    for line in proc.stdout:
        if line.startswith("kvstore node listening on "):
            endpoint = line.split()[-1]
            break
    try:
        assert endpoint, "store node did not start"
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_a_launched_tiny_worker_gets_ready_with_its_role_and_stop_leaves_no_process(
    tiny_model_dir: Path, store_node: str, tmp_path: Path
) -> None:
    config = LocalLauncherConfig(
        model_dir=tiny_model_dir,
        store_endpoint=store_node,
        max_model_len=512,
        log_dir=tmp_path / "logs",
    )

    async def scenario() -> None:
        launcher = LocalProcessLauncher(config)
        try:
            worker = await launcher.launch(WorkerRole.PREFILL)
            client = WorkerClient(worker.endpoint)
            try:
                deadline = time.monotonic() + 300
                while True:
                    assert worker.alive(), "\n".join(worker.tail)
                    assert time.monotonic() < deadline, "\n".join(worker.tail)
                    try:
                        health = await client.health(timeout_s=5)
                    except WorkerError:
                        await asyncio.sleep(0.5)
                        continue
                    if health.ready:
                        break
                    await asyncio.sleep(0.5)
            finally:
                await client.close()
            assert health.role is WorkerRole.PREFILL
            assert health.block_size > 0
            procs = descendants(worker.pid) | {worker.pid}
            assert len(procs) >= 2, procs  # the worker and vLLM's engine-core process
            await worker.stop(timeout_s=30)
            assert wait_gone(procs) == [], "processes left behind"
            assert launcher.workers == ()
        finally:
            await launcher.close()

    asyncio.run(scenario())


def test_config_is_validated(tmp_path: Path) -> None:
    base = stand_in(tmp_path)
    with pytest.raises(ValueError, match=r"no config\.json"):
        LocalLauncherConfig(model_dir=tmp_path, store_endpoint="127.0.0.1:1")
    with pytest.raises(ValueError, match="HOST:PORT"):
        LocalLauncherConfig(model_dir=base.model_dir, store_endpoint="nohost")
    with pytest.raises(ValueError, match="cores_per_engine"):
        LocalLauncherConfig(model_dir=base.model_dir, store_endpoint="h:1", cores_per_engine=0)
    with pytest.raises(ValueError, match="pool has 2 cores"):
        LocalProcessLauncher(
            LocalLauncherConfig(
                model_dir=base.model_dir, store_endpoint="h:1", cpus=(0, 1), cores_per_engine=3
            )
        )
