"""The `strata` command.

    strata serve   [--model DIR] [--host H] [--port P] ...   everything on this host (default setup)
    strata worker  --role {prefill,decode,both} --model DIR --store HOST:PORT ...
    strata worker  --engine simulated --role R --model DIR --profile YAML [--instances N] ...
                   SIMULATED engines (simulator/worker.py), for control-plane load tests only
    strata store   --port P --arena-size 2GiB ...
    strata gateway --model-dir DIR --prefill HOST:PORT --decode HOST:PORT ...
    strata simulate --config FILE [--trace PATH] [--out DIR]   the simulator (simulator/)
    strata profile --worker HOST:PORT [--worker HOST:PORT] --model-dir DIR --out FILE.yaml
                   times running workers' engines into a simulator profile (simulator/measure.py)
    strata models  prepare-default | build-tiny OUT
    strata admin   [--address HOST:PORT] [--token T] list | stats | scale ... (strata/admin_cli.py)
    strata tenants --redis URL --cluster-key-file F add | remove | remove-key | list (API keys)

`serve` starts one store node and the gateway; the gateway's launcher starts the workers (one
prefill and one decode by default, each engine pinned to its own cores) and the gateway serves the
admin API on loopback (`strata admin`, port 50050 by default). It then waits; Ctrl-C or SIGTERM
stops all of them. The cluster key, CACHE_DIR/cluster.key (created 0600 on first start), is given
to each of them as a file (`--cluster-key-file`): the store node's metadata service and the
workers answer only callers that hold it (docs/design/security.md §3.2).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import sys
from pathlib import Path

from controlplane.admin.config import ADMIN_TOKEN_ENV, DEFAULT_ADMIN_PORT
from strata.serve_config import ENV_PREFIX as SERVE_ENV_PREFIX
from strata.serve_config import ServeConfig
from strata.supervisor import Service, ServiceError, Supervisor
from strata_common.endpoints import format_endpoint
from strata_common.options import add_options, from_namespace
from strata_common.units import format_duration, format_size

CLUSTER_KEY_FILE_NAME = "cluster.key"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _admin_port(requested: int | None, host: str) -> int:
    """The admin port `serve` gives the gateway: ``requested`` (0 = a free one), or by default
    DEFAULT_ADMIN_PORT (what `strata admin` calls without --address) unless that one is taken
    (e.g. by another `strata serve`), then a free one."""
    if requested is not None:
        return requested if requested else _free_port(host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds it
        try:
            s.bind((host, DEFAULT_ADMIN_PORT))
            return DEFAULT_ADMIN_PORT
        except OSError:
            pass
    port = _free_port(host)
    print(
        f"strata: admin port {DEFAULT_ADMIN_PORT} is taken; using {port} "
        f"(`strata admin --address {host}:{port} ...`)",
        flush=True,
    )
    return port


def _admin_token(cache_dir: Path) -> tuple[str, Path | None]:
    """(token, file): $STRATA_ADMIN_TOKEN when set (no file), else the token kept in
    CACHE_DIR/admin-token, created 0600 on first use (strata/admin_token.py)."""
    from strata.admin_token import default_token_path, load_or_create_token

    env_token = os.environ.get(ADMIN_TOKEN_ENV)
    if env_token:
        return env_token, None
    path = default_token_path(cache_dir)
    token, _ = load_or_create_token(path)
    return token, path


def _cluster_key_file(cache_dir: Path) -> Path:
    """CACHE_DIR/cluster.key: kept while only its owner can read it, else (re)created 0600
    (strata_common/credentials.py); every service of this host gets the path, never the key."""
    from strata_common.credentials import load_or_create_cluster_key

    path = cache_dir / CLUSTER_KEY_FILE_NAME
    load_or_create_cluster_key(path)
    return path


def _admin_instances(address: str, token: str) -> list[tuple[str, str]]:
    """(role, endpoint) of every instance the gateway lists, through its admin API."""
    import grpc

    from controlplane.admin.convert import instance_from_proto
    from controlplane.workers.roles import role_name
    from strata_proto import admin_pb2, admin_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            reply = admin_pb2_grpc.AdminStub(channel).List(
                admin_pb2.ListRequest(),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=30,
            )
    except grpc.RpcError as exc:
        raise ServiceError(f"the gateway's admin API at {address}: {exc.details()}") from None
    infos = sorted((instance_from_proto(m) for m in reply.instances), key=lambda i: i.endpoint)
    return [(role_name(i.role), i.endpoint) for i in infos]


def engine_core_sets(num_engines: int) -> list[list[int]]:
    """Split this process's CPUs between engines; two unpinned engines on 2 cores are ~6x slower."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < num_engines:
        return [[cpus[i % len(cpus)]] for i in range(num_engines)]
    per = len(cpus) // num_engines
    return [cpus[i * per : (i + 1) * per] for i in range(num_engines)]


def serve(config: ServeConfig) -> int:
    if config.model is not None:
        model_dir = config.model.resolve()
    else:
        from strata.models import prepare_default_model

        model_dir = prepare_default_model(config.cache_dir)
    name = config.served_model_name or model_dir.name
    from strata.models import default_cache_dir

    cache_dir = config.cache_dir if config.cache_dir is not None else default_cache_dir()
    # The store node serves its embedded metadata to this host over gRPC (strata://, its
    # --metadata-port): the workers publish their engines' prefix caches there as HBM events
    # (dataplane/hbm_events.py) and the gateway's prefix index follows them.
    store_args = ["--arena-size", format_size(config.store_arena_size), "--metadata", "embedded"]
    if config.kv_ssd:
        ssd_dir = config.kv_ssd_dir if config.kv_ssd_dir is not None else cache_dir / "kvstore"
        ssd_dir.mkdir(parents=True, exist_ok=True)
        # Write-behind: every block also goes to SSD, so a restarted `strata serve` still has it.
        store_args += ["--ssd-dir", str(ssd_dir), "--ssd-size", format_size(config.kv_ssd_size)]
        store_args += ["--ssd-ttl", format_duration(config.kv_ssd_ttl_s), "--write-behind", "true"]
        if config.kv_ssd_write_through:
            store_args += ["--write-through", "true"]
    loopback = "127.0.0.1"
    py = sys.executable
    sup = Supervisor()
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    code = 1
    try:
        key_file = _cluster_key_file(cache_dir)
        store_port = _free_port(loopback)
        metadata_port = _free_port(loopback)
        while metadata_port == store_port:
            metadata_port = _free_port(loopback)
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
                    "--metadata-port",
                    str(metadata_port),
                    "--cluster-key-file",
                    str(key_file),
                    *store_args,
                ],
                r"listening on",
                env_prefixes=("STRATA_KVSTORE_",),
            ),
            config.ready_timeout_s,
        )
        store = f"{loopback}:{store_port}"
        metadata = f"strata://{loopback}:{metadata_port}"
        token, token_file = _admin_token(cache_dir)
        admin_port = _admin_port(config.admin_port, loopback)
        admin = format_endpoint(loopback, admin_port)
        num_engines = config.prefill_workers + config.decode_workers
        cores_per_engine = max(1, len(os.sched_getaffinity(0)) // num_engines)
        # Options every `strata worker` gets, beyond what the gateway's --launch-* flags say.
        worker_args: list[str] = []
        if config.dtype != "auto":
            worker_args += ["--dtype", config.dtype]
        # The gateway's launcher starts the workers (so `strata admin scale` can stop them and
        # start more); they publish their prefix caches to the store node's embedded metadata
        # (strata://) as HBM events (dataplane/hbm_events.py).
        gateway_argv = [
            py,
            "-m",
            "controlplane.gateway",
            "--model-dir",
            str(model_dir),
            "--served-model-name",
            name,
            "--host",
            config.host,
            "--port",
            str(config.port),
            "--worker-startup-timeout",
            format_duration(config.ready_timeout_s),
            "--admin-host",
            loopback,
            "--admin-port",
            str(admin_port),
            "--launch-store",
            store,
            "--launch-prefill",
            str(config.prefill_workers),
            "--launch-decode",
            str(config.decode_workers),
            "--launch-kv-metadata",
            metadata,
            "--kv-metadata",
            metadata,
            "--launch-kv-cache-size",
            format_size(config.kv_cache_size),
            "--launch-cores-per-engine",
            str(cores_per_engine),
            "--cluster-key-file",  # its calls, and its launched workers' (the path, not the key)
            str(key_file),
        ]
        if config.max_model_len:
            gateway_argv += ["--launch-max-model-len", str(config.max_model_len)]
        if config.standby_workers:
            gateway_argv += ["--launch-standby", str(config.standby_workers)]
        if worker_args:
            gateway_argv += ["--launch-worker-args", shlex.join(worker_args)]
        if token_file is not None:
            gateway_argv += ["--admin-token-file", str(token_file)]
        if config.api_keys_file is not None:  # the gateway checks it (0600, its lines)
            gateway_argv += ["--api-keys-file", str(config.api_keys_file.resolve())]
        if config.insecure:
            gateway_argv += ["--insecure", "true"]
        # The gateway is ready once every worker is: allow for the engines' start-up.
        sup.start(
            Service(
                "gateway",
                gateway_argv,
                r"strata gateway listening on",
                # Its launcher passes the workers theirs (STRATA_WORKER_*), scrubbed again.
                env_prefixes=("STRATA_GATEWAY_", "STRATA_WORKER_"),
                keep_env=(ADMIN_TOKEN_ENV,),
            ),
            config.ready_timeout_s + 60,
        )
        instances = _admin_instances(admin, token)
        endpoints = {
            role: ",".join(e for r, e in instances if r == role) for role in ("prefill", "decode")
        }
        print(
            f"strata: store={store} prefill={endpoints['prefill']} decode={endpoints['decode']}",
            flush=True,
        )
        where = f"in {token_file}" if token_file is not None else f"${ADMIN_TOKEN_ENV}"
        print(f"strata: admin API on {admin} (token {where}): `strata admin list`", flush=True)
        print(f"strata: cluster key in {key_file} (--cluster-key-file)", flush=True)
        print(
            f"strata: serving {name} on http://{format_endpoint(config.host, config.port)}/v1",
            flush=True,
        )
        code = sup.wait()
    except (ServiceError, OSError) as exc:  # OSError: e.g. the token file cannot be written
        print(f"strata serve: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        sup.stop_all(timeout_s=60.0)  # the gateway stops its workers first (20 s grace each)
        print("strata: stopped", flush=True)
    return code


def _engine_flag(argv: list[str]) -> tuple[str, list[str]]:
    """`strata worker`'s ``--engine vllm|simulated`` (default vllm), and the other arguments."""
    rest: list[str] = []
    engine = "vllm"
    args = iter(argv)
    for arg in args:
        if arg == "--engine":
            engine = next(args, "")
        elif arg.startswith("--engine="):
            engine = arg.partition("=")[2]
        else:
            rest.append(arg)
    return engine, rest


_SUBCOMMANDS = (
    "worker",
    "store",
    "gateway",
    "models",
    "admin",
    "certs",
    "tenants",
    "simulate",
    "profile",
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="strata", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="serve a model on this host")
    add_options(serve_parser, ServeConfig, env_prefix=SERVE_ENV_PREFIX)
    for name in _SUBCOMMANDS:
        sub.add_parser(name, add_help=False)
    if argv and argv[0] in _SUBCOMMANDS:
        command, rest = argv[0], argv[1:]
        if command == "simulate":
            from simulator.cli import main as simulate_main

            return simulate_main(rest)
        if command == "profile":
            from simulator.measure import main as profile_main

            return profile_main(rest)
        if command == "tenants":
            from strata.tenants_cli import main as tenants_main

            return tenants_main(rest)
        if command == "certs":
            from strata.certs import main as certs_main

            return certs_main(rest)
        if command == "admin":
            from strata.admin_cli import main as admin_main

            return admin_main(rest)
        if command == "worker":
            engine, rest = _engine_flag(rest)
            if engine == "simulated":  # never vLLM: simulator/worker.py
                from simulator.worker import main as simulated_worker_main

                return simulated_worker_main(rest)
            if engine != "vllm":
                print(
                    f"strata worker: --engine is vllm or simulated, not {engine!r}", file=sys.stderr
                )
                return 2
            from dataplane.worker import main as worker_main

            return worker_main(rest)
        if command == "store":
            from kvstore.server.cli import main as store_main

            return int(store_main(rest) or 0)
        if command == "gateway":
            from controlplane.gateway import main as gateway_main

            return int(gateway_main(rest) or 0)
        from strata.models import main as models_main

        return int(models_main(rest) or 0)
    args = parser.parse_args(argv)
    try:
        config = from_namespace(ServeConfig, args)
    except ValueError as exc:
        serve_parser.error(str(exc))
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())
