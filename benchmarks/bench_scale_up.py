"""Adding an engine: time from `strata admin scale --replicas N+1` to the new engine serving.

Runs `strata serve` (1 prefill + 1 decode, pinned to this host's cores as serve does), waits for
it (and, with ``--standby 1``, for its standby workers), keeps a light load of sequential chat
requests going, then runs `strata admin scale --role ROLE --replicas 2` as an operator would and
measures, from the moment the command starts:

- **scale returned**: the admin call came back;
- **ready**: `strata admin list` shows the new instance ready;
- **serving**: the new worker's own Stats count a request (a client request routed to it).

Each repeat scales back down to 1 (drain, stop) and waits for the standby to be replenished.
Where a fresh engine was started, its start-up timeline (the worker's "start-up:" log line:
imports / engine / serving) says where the time went. The limit printed beside: the same
worker's start-up on an idle host is the floor of a cold launch; a standby's is one Health call.

    python benchmarks/bench_scale_up.py [--model DIR] [--standby 0|1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import REPO, Server, free_port, host_info, http_json, load_avg, log
from strata_proto import worker_pb2, worker_pb2_grpc

READY = re.compile(r"strata: serving \S+ on ")
WORKER_READY = re.compile(r"strata worker ready role=(\w+) listening on (\S+)")
STARTUP = re.compile(r"\[(\w+-\d+)\].*start-up: (.*)")


class Admin:
    """The admin API, called in-process (a `strata admin` process per poll would itself load a
    2-core host and add its own start-up to every figure)."""

    def __init__(self, address: str, cache_dir: Path) -> None:
        from strata.admin_token import default_token_path
        from strata_proto import admin_pb2_grpc

        token = default_token_path(cache_dir).read_text().strip()
        self._metadata = [("authorization", f"Bearer {token}")]
        self._channel = grpc.insecure_channel(address)
        self._stub = admin_pb2_grpc.AdminStub(self._channel)

    def list(self) -> list[dict[str, Any]]:
        from controlplane.admin.convert import instance_from_proto
        from strata.admin_cli import instance_json
        from strata_proto import admin_pb2

        reply = self._stub.List(admin_pb2.ListRequest(), metadata=self._metadata, timeout=60)
        return [instance_json(instance_from_proto(m)) for m in reply.instances]

    def scale(self, role: str, replicas: int) -> None:
        from controlplane.admin.convert import role_from_name
        from strata_proto import admin_pb2

        request = admin_pb2.ScaleRequest(role=role_from_name(role).value, replicas=replicas)
        self._stub.Scale(request, metadata=self._metadata, timeout=600)

    def close(self) -> None:
        self._channel.close()


def worker_requests(endpoint: str, cache_dir: Path) -> int:
    """Requests the worker has had, asked as a gateway with serve's cluster key (a worker
    answers no one else: docs/design/security.md §5.1)."""
    from strata.cli import CLUSTER_KEY_FILE_NAME
    from strata_common.credentials import Identity, read_cluster_key
    from strata_common.grpc_auth import ClientAuth

    auth = ClientAuth(
        read_cluster_key(cache_dir / CLUSTER_KEY_FILE_NAME), Identity("gateway", "bench")
    )
    with grpc.insecure_channel(endpoint) as channel:
        stub = worker_pb2_grpc.WorkerStub(auth.intercept(channel))
        stats = stub.Stats(worker_pb2.StatsRequest(), timeout=5)
        return int(stats.num_requests)


class Load:
    """Sequential chat requests (one at a time) until stopped."""

    def __init__(self, base_url: str, model: str) -> None:
        self._url = f"{base_url}/v1/chat/completions"
        self._model = model
        self._stop = threading.Event()
        self.num_ok = 0
        self.num_failed = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            body = {
                "model": self._model,
                "messages": [{"role": "user", "content": f"count the towers of the river {i}"}],
                "max_tokens": 16,
                "temperature": 0,
            }
            try:
                http_json(self._url, body, timeout_s=120)
                self.num_ok += 1
            except Exception:
                self.num_failed += 1
                time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model dir (default: tiny model)")
    ap.add_argument("--standby", type=int, default=0, help="strata serve --standby-workers")
    ap.add_argument("--role", default="decode", choices=["prefill", "decode"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from strata.models import build_tiny_model

        cache = Path(os.environ.get("STRATA_CACHE_DIR", REPO / ".cache")) / "models"
        model = build_tiny_model(cache / "tiny-llama-seed0", seed=0)
    work = Path(tempfile.mkdtemp(prefix="strata-bench-scale-"))
    port = free_port()
    admin_port = free_port()
    address = f"127.0.0.1:{admin_port}"
    argv = [sys.executable, "-m", "strata", "serve", "--model", str(model), "--port", str(port)]
    argv += ["--admin-port", str(admin_port), "--cache-dir", str(work), "--no-kv-ssd"]
    argv += ["--standby-workers", str(args.standby)]
    server = Server("serve", argv, {}, work / "serve.log")
    info = host_info()
    log(f"host: {info}; model {model.name}; standby {args.standby}; role {args.role}")
    server.start()
    results: list[dict[str, float]] = []
    try:
        server.wait_for(READY, 900)
        engines = 2 + 2 * args.standby
        server.wait_for(WORKER_READY, 900, count=engines)
        base_url = f"http://127.0.0.1:{port}"
        admin = Admin(address, work)
        load = Load(base_url, model.name)
        load.start()
        try:
            for repeat in range(args.repeats):
                before = {i["id"] for i in admin.list()}
                startups_before = len([ln for ln in server.lines if STARTUP.search(ln)])
                t0 = time.monotonic()
                admin.scale(args.role, 2)
                t_returned = time.monotonic() - t0
                new: dict[str, Any] | None = None
                t_ready = t_serving = None
                while time.monotonic() - t0 < 900:
                    listed = [i for i in admin.list() if i["id"] not in before]
                    if listed:
                        new = listed[0]
                        if t_ready is None and new["state"] == "ready":
                            t_ready = time.monotonic() - t0
                        if t_ready is not None and worker_requests(new["endpoint"], work) > 0:
                            t_serving = time.monotonic() - t0
                            break
                    time.sleep(0.1)
                if new is None or t_ready is None or t_serving is None:
                    raise RuntimeError(f"the new {args.role} engine did not serve: {new}")
                startup = [m.group(2) for ln in server.lines if (m := STARTUP.search(ln))]
                row = {
                    "scale_returned_s": round(t_returned, 2),
                    "ready_s": round(t_ready, 2),
                    "serving_s": round(t_serving, 2),
                    "load_avg": load_avg(),
                }
                log(
                    f"repeat {repeat}: scale returned {t_returned:.2f} s, ready {t_ready:.2f} s, "
                    f"serving {t_serving:.2f} s (load avg {row['load_avg']})"
                )
                for line in startup[startups_before:]:
                    log(f"    a worker started meanwhile: {line}")
                results.append(row)
                admin.scale(args.role, 1)
                # Back to the starting point: each scale-up started one worker (the new engine,
                # or the standby's replacement); wait until it is ready.
                server.wait_for(WORKER_READY, 900, count=engines + repeat + 1)
                time.sleep(5)  # the scaled-down engine drained and stopped
        finally:
            load.stop()
            admin.close()
        cold = [m.group(2) for ln in server.lines if (m := STARTUP.search(ln))]
        log(f"requests: {load.num_ok} ok, {load.num_failed} failed")
        log("start-up timelines of the workers of this run (imports / engine / serving):")
        for line in cold:
            log(f"    {line}")
        serving = sorted(r["serving_s"] for r in results)
        print(
            json.dumps(
                {
                    "standby": args.standby,
                    "role": args.role,
                    "serving_s": serving,
                    "median_serving_s": serving[len(serving) // 2],
                    "results": results,
                    "host": info,
                }
            )
        )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
