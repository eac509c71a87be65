"""A ScriptedWorker in a process of its own: a TEST DOUBLE of `python -m dataplane.worker` for
tests that need a real process to kill (the launcher's restart of launched workers).

`stand_in_python(tmp_path)` writes an executable to give as ``LocalLauncherConfig.python``: the
launcher runs it with the worker's argv (``-m dataplane.worker --role R --model DIR --store S
--host H --port P ...``); it serves the scripted worker on ``H:P`` (the model's tokenizer, the
default script) and prints the worker's ready line. With ``$STRATA_TEST_CRASH_FILE`` naming a file
that exists, it exits ``$STRATA_TEST_CRASH_AFTER`` seconds after it is ready (a crash loop).
Test code only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

CRASH_FILE_ENV = "STRATA_WORKER_TEST_CRASH_FILE"  # STRATA_WORKER_*: launched workers get it
CRASH_AFTER_ENV = "STRATA_WORKER_TEST_CRASH_AFTER"


def stand_in_python(directory: Path) -> Path:
    """An executable that runs this module's `main` (the launcher's ``python``)."""
    repo_root = Path(__file__).resolve().parents[3]
    path = directory / "scripted_worker_python"
    path.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(repo_root)!r})\n"
        "from tests.integration.controlplane.scripted_worker_process import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    path.chmod(0o755)
    return path


async def _serve(role: str, model: Path, host: str, port: int) -> None:
    from tokenizers import Tokenizer

    from strata_proto import worker_pb2
    from tests.integration.controlplane.scripted_worker import (
        BLOCK_SIZE,
        MAX_MODEL_LEN,
        ScriptedWorker,
        default_script,
    )

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    roles = {"prefill": worker_pb2.ROLE_PREFILL, "decode": worker_pb2.ROLE_DECODE}
    worker = ScriptedWorker(
        roles[role],
        default_script(tokenizer),
        tokenizer,
        max_model_len=MAX_MODEL_LEN,
        block_size=BLOCK_SIZE,
    )
    await worker.start(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"strata worker ready role={role} listening on {host}:{port}", flush=True)
    crash_file = os.environ.get(CRASH_FILE_ENV, "")
    if crash_file and Path(crash_file).exists():
        await asyncio.sleep(float(os.environ.get(CRASH_AFTER_ENV, "0.5")))
        print("scripted worker: crashing as told", flush=True)
        os._exit(3)
    await stop.wait()
    await worker.stop()


def main(argv: list[str]) -> int:
    if argv[:2] != ["-m", "dataplane.worker"]:
        print(f"unexpected argv: {argv}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args(argv[2:])
    asyncio.run(_serve(args.role, args.model, args.host, args.port))
    return 0
