"""The `strata` command.

    strata serve   [--model DIR] [--host H] [--port P] ...   everything on this host (default setup)
    strata worker  --role {prefill,decode,both} --model DIR --store HOST:PORT ...
    strata store   --port P --arena-size 2GiB ...
    strata gateway --model-dir DIR --prefill HOST:PORT --decode HOST:PORT ...
    strata models  prepare-default | build-tiny OUT
    strata admin   [--address HOST:PORT] [--token T] list | stats | scale ... (strata/admin_cli.py)

`serve` starts one store node, one prefill worker and one decode worker (each engine pinned to its
own cores) and the gateway, then waits; Ctrl-C or SIGTERM stops all of them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from strata.supervisor import Service, ServiceError, Supervisor


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def engine_core_sets(num_engines: int) -> list[list[int]]:
    """Split this process's CPUs between engines; two unpinned engines on 2 cores are ~6x slower."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < num_engines:
        return [[cpus[i % len(cpus)]] for i in range(num_engines)]
    per = len(cpus) // num_engines
    return [cpus[i * per : (i + 1) * per] for i in range(num_engines)]


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="HF model directory (default: SmolLM2-135M-Instruct)"
    )
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--kv-cache-size", default="1GiB", help="per engine")
    p.add_argument("--store-arena-size", default="2GiB")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument(
        "--cache-dir", default=None, help="prepared models and the SSD tier (~/.cache/strata)"
    )
    p.add_argument(
        "--kv-ssd-dir", default=None, help="the store's SSD tier (default: CACHE_DIR/kvstore)"
    )
    p.add_argument("--kv-ssd-size", default="16GiB", help="SSD tier capacity")
    p.add_argument("--kv-ssd-ttl", default="24h", help="SSD blocks expire after this")
    p.add_argument("--no-kv-ssd", action="store_true", help="DRAM-only store (nothing survives)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds per service")


def serve(args: argparse.Namespace) -> int:
    if args.model:
        model_dir = Path(args.model).resolve()
        if not (model_dir / "config.json").is_file():
            print(
                f"strata serve: {model_dir} is not a Hugging Face model directory", file=sys.stderr
            )
            return 2
    else:
        from strata.models import prepare_default_model

        model_dir = prepare_default_model(Path(args.cache_dir) if args.cache_dir else None)
    name = args.served_model_name or model_dir.name
    from strata.models import default_cache_dir

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    store_args = ["--arena-size", args.store_arena_size]
    if not args.no_kv_ssd:
        ssd_dir = Path(args.kv_ssd_dir) if args.kv_ssd_dir else cache_dir / "kvstore"
        ssd_dir.mkdir(parents=True, exist_ok=True)
        # Write-behind: every block also goes to SSD, so a restarted `strata serve` still has it.
        store_args += ["--ssd-dir", str(ssd_dir), "--ssd-size", args.kv_ssd_size]
        store_args += ["--ssd-ttl", args.kv_ssd_ttl, "--write-behind", "true"]
    loopback = "127.0.0.1"
    py = sys.executable
    sup = Supervisor()
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    code = 1
    try:
        store_port = _free_port(loopback)
        sup.start(
            Service(
                "store",
                [
                    py,
                    "-m",
                    "kvstore.server",
                    "--host",
                    loopback,
                    "--port",
                    str(store_port),
                    *store_args,
                ],
                r"listening on",
            ),
            args.ready_timeout,
        )
        store = f"{loopback}:{store_port}"
        cores = engine_core_sets(2)
        endpoints: dict[str, str] = {}
        workers = []
        for role, core_set in zip(("prefill", "decode"), cores, strict=True):
            port = _free_port(loopback)
            argv = [
                py,
                "-m",
                "dataplane.worker",
                "--role",
                role,
                "--model",
                str(model_dir),
                "--store",
                store,
                "--host",
                loopback,
                "--port",
                str(port),
                "--kv-cache-size",
                args.kv_cache_size,
            ]
            if args.max_model_len:
                argv += ["--max-model-len", str(args.max_model_len)]
            env = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, core_set))}
            workers.append(Service(role, argv, r"strata worker ready", env=env))
            endpoints[role] = f"{loopback}:{port}"
        # Start both engines at once (startup is the slow part), then wait for both.
        for w in workers:
            sup.services.append(w)
            w.start()
        for w in workers:
            w.wait_ready(args.ready_timeout)
        sup.start(
            Service(
                "gateway",
                [
                    py,
                    "-m",
                    "controlplane.gateway",
                    "--model-dir",
                    str(model_dir),
                    "--served-model-name",
                    name,
                    "--prefill",
                    endpoints["prefill"],
                    "--decode",
                    endpoints["decode"],
                    "--host",
                    args.host,
                    "--port",
                    str(args.port),
                ],
                r"listening on",
            ),
            args.ready_timeout,
        )
        print(
            f"strata: store={store} prefill={endpoints['prefill']} decode={endpoints['decode']}",
            flush=True,
        )
        print(f"strata: serving {name} on http://{args.host}:{args.port}/v1", flush=True)
        code = sup.wait()
    except ServiceError as exc:
        print(f"strata serve: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        sup.stop_all()
        print("strata: stopped", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="strata", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_arguments(sub.add_parser("serve", help="serve a model on this host"))
    for name in ("worker", "store", "gateway", "models", "admin"):
        sub.add_parser(name, add_help=False)
    if argv and argv[0] in ("worker", "store", "gateway", "models", "admin"):
        command, rest = argv[0], argv[1:]
        if command == "admin":
            from strata.admin_cli import main as admin_main

            return admin_main(rest)
        if command == "worker":
            from dataplane.worker import main as worker_main

            return worker_main(rest)
        if command == "store":
            from kvstore.server import main as store_main

            return int(store_main(rest) or 0)
        if command == "gateway":
            from controlplane.gateway import main as gateway_main

            return int(gateway_main(rest) or 0)
        from strata.models import main as models_main

        return int(models_main(rest) or 0)
    args = parser.parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
