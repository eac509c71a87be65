"""`strata admin`: the operator's client of the gateway's admin gRPC API (controlplane/admin/).

    strata admin [--address HOST:PORT] [--token T] [--json] [--timeout S] COMMAND
      list                                  one line per instance: id, role, state, endpoint, load
      stats                                 policy, request counters, predictor error, instances
      add --role {prefill,decode,both} --endpoint HOST:PORT
      drain ID
      remove ID [--wait S]
      scale --role {prefill,decode} --replicas N
      set-role ID --role {prefill,decode,both}
      policy NAME

The token comes from, in this order: --token, --token-file PATH, STRATA_ADMIN_TOKEN, then the
file `strata serve` writes (CACHE_DIR/admin-token, CACHE_DIR = $STRATA_CACHE_DIR or
~/.cache/strata) if it exists. The address comes from --address or STRATA_ADMIN_ADDRESS (default
127.0.0.1:50050, `strata serve`'s default). `--json` prints machine-readable output.

Instead of the token, cluster credentials of role admin (docs/design/security.md §5.1):
`--tls-cert/--tls-key/--tls-ca` (TLS mode: an admin/NAME certificate; the gateway's admin port
then requires a certificate of the cluster anyway) or `--cluster-key-file PATH [--name NAME]`
(secret mode: admin/NAME, default $USER). With them no token is taken from the environment or
the default file; an explicit --token/--token-file still decides alone.

Exit codes: 0 ok · 1 the server failed (INTERNAL or any other code) · 2 bad arguments (usage, or
INVALID_ARGUMENT) · 3 not authenticated (missing/wrong token) · 4 unknown instance (NOT_FOUND) ·
5 conflict (ALREADY_EXISTS, FAILED_PRECONDITION) · 6 gateway unreachable or too slow
(UNAVAILABLE, DEADLINE_EXCEEDED). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from controlplane.admin.config import ADMIN_TOKEN_ENV, DEFAULT_ADMIN_PORT
from controlplane.admin.convert import instance_from_proto, role_from_name, stats_from_proto
from controlplane.instances.types import ClusterStats, InstanceInfo, InvalidAdminRequest
from controlplane.workers.roles import role_name
from strata.admin_token import TokenFileError, default_token_path, read_token_file
from strata_common.credentials import CredentialError, Identity, read_cluster_key
from strata_common.endpoints import EndpointError, parse_endpoint
from strata_common.grpc_auth import ClientAuth, blocking_channel
from strata_common.tls import TlsConfig
from strata_proto import admin_pb2, admin_pb2_grpc

ADDRESS_ENV = "STRATA_ADMIN_ADDRESS"
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_ADMIN_PORT}"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ARGUMENTS = 2
EXIT_UNAUTHENTICATED = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5
EXIT_UNREACHABLE = 6

_EXIT_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_BAD_ARGUMENTS,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_UNAUTHENTICATED,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_CONFLICT,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_CONFLICT,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNREACHABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNREACHABLE,
}


def exit_code_for(code: grpc.StatusCode) -> int:
    return _EXIT_BY_CODE.get(code, EXIT_FAILED)


def _role_arg(text: str) -> str:
    try:
        role_from_name(text)
    except InvalidAdminRequest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="strata admin",
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="exit codes: 0 ok, 1 server error, 2 bad arguments, 3 not authenticated, "
        "4 unknown instance, 5 conflict, 6 gateway unreachable",
    )
    p.add_argument(
        "--address",
        default=None,
        help=f"the gateway's admin HOST:PORT (default: ${ADDRESS_ENV} or {DEFAULT_ADDRESS})",
    )
    p.add_argument("--token", default=None, help="bearer token (visible in `ps`: prefer a file)")
    p.add_argument(
        "--token-file",
        default=None,
        help=f"file holding the token (default: ${ADMIN_TOKEN_ENV}, else {default_token_path()} "
        "if it exists)",
    )
    creds = p.add_argument_group(
        "cluster credentials (instead of the token: role admin, docs/design/security.md §5.1)"
    )
    creds.add_argument(
        "--cluster-key-file",
        default=None,
        help="the cluster key (0600 file): call as admin/NAME (secret mode, loopback)",
    )
    creds.add_argument(
        "--name", default=None, help="NAME of admin/NAME with --cluster-key-file (default: $USER)"
    )
    creds.add_argument("--tls-cert", default=None, help="an admin/NAME certificate (TLS mode)")
    creds.add_argument("--tls-key", default=None, help="its private key (0600 file)")
    creds.add_argument("--tls-ca", default=None, help="the cluster CA's certificate")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per call (default 300)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="one line per instance")
    sub.add_parser("stats", help="policy, counters, predictor error, instances")
    add = sub.add_parser("add", help="register an externally started `strata worker`")
    add.add_argument("--role", required=True, type=_role_arg, help="prefill, decode or both")
    add.add_argument("--endpoint", required=True, help="the worker's HOST:PORT")
    drain = sub.add_parser("drain", help="stop new requests to an instance")
    drain.add_argument("id")
    remove = sub.add_parser("remove", help="drain, wait, then forget (and stop) an instance")
    remove.add_argument("id")
    remove.add_argument(
        "--wait", type=float, default=None, help="seconds to wait for in-flight requests (30)"
    )
    scale = sub.add_parser("scale", help="launch or stop instances until N of a role remain")
    scale.add_argument("--role", required=True, choices=["prefill", "decode"])
    scale.add_argument("--replicas", required=True, type=int)
    set_role = sub.add_parser("set-role", help="change an instance's role")
    set_role.add_argument("id")
    set_role.add_argument("--role", required=True, type=_role_arg, help="prefill, decode or both")
    policy = sub.add_parser("policy", help="choose the scheduling policy")
    policy.add_argument("name")
    return p


# -- output ----------------------------------------------------------------------------------

_COLUMNS = ("ID", "ROLE", "STATE", "ENDPOINT", "LOAD")


def _load_text(info: InstanceInfo) -> str:
    if info.capacity == 0:
        return f"{info.in_flight}/?"
    return f"{info.load:.2f} ({info.in_flight}/{info.capacity})"


def format_instances(infos: Sequence[InstanceInfo]) -> list[str]:
    """A header, then one line per instance; columns aligned."""
    rows = [_COLUMNS] + [
        (i.id, role_name(i.role), i.state.value, i.endpoint, _load_text(i)) for i in infos
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(_COLUMNS) - 1)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]


def format_planned(planned: Sequence[str]) -> list[str]:
    """A dry-run gateway's planned write requests (nothing changed), one per line, then a blank
    line; nothing when there are none."""
    if not planned:
        return []
    return [
        "dry run: nothing changed; the gateway's launcher would send:",
        *(f"  {line}" for line in planned),
        "",
    ]


def instance_json(info: InstanceInfo) -> dict[str, Any]:
    d = asdict(info)
    d["role"] = role_name(info.role)
    d["state"] = info.state.value
    return d


def stats_json(stats: ClusterStats) -> dict[str, Any]:
    d = asdict(stats)
    d["instances"] = [instance_json(i) for i in stats.instances]
    return d


def _mape(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def format_stats(stats: ClusterStats) -> list[str]:
    lines = [
        f"policy: {stats.policy}",
        f"requests: {stats.requests_total} total, {stats.requests_rejected} rejected, "
        f"{stats.requests_failed_over} failed over",
        f"predictor MAPE: TTFT {_mape(stats.predictor_ttft_mape)}, "
        f"TPOT {_mape(stats.predictor_tpot_mape)}",
    ]
    lines += [f"{k}: {v:g}" for k, v in sorted(stats.extra.items())]
    return [*lines, "", *format_instances(stats.instances)]


# -- calls -----------------------------------------------------------------------------------


def _run(args: argparse.Namespace, stub: Any, metadata: list[tuple[str, str]]) -> list[str]:
    """One RPC; returns the lines to print."""

    timeout_s = args.timeout
    if args.command == "remove" and args.wait is not None and math.isfinite(args.wait):
        timeout_s = max(timeout_s, args.wait + 30.0)  # the server waits up to --wait itself

    def call(method: Any, request: Any) -> Any:
        return method(request, metadata=metadata, timeout=timeout_s)

    if args.command == "list":
        reply = call(stub.List, admin_pb2.ListRequest())
        infos = [instance_from_proto(m) for m in reply.instances]
        if args.json:
            return [json.dumps([instance_json(i) for i in infos])]
        return format_instances(infos)
    if args.command == "stats":
        stats = stats_from_proto(call(stub.Stats, admin_pb2.StatsRequest()))
        return [json.dumps(stats_json(stats))] if args.json else format_stats(stats)
    if args.command == "scale":
        reply = call(
            stub.Scale,
            admin_pb2.ScaleRequest(role=role_from_name(args.role).value, replicas=args.replicas),
        )
        infos = [instance_from_proto(m) for m in reply.instances]
        if args.json:
            listed = [instance_json(i) for i in infos]
            if reply.planned:
                return [json.dumps({"planned": list(reply.planned), "instances": listed})]
            return [json.dumps(listed)]
        return format_planned(reply.planned) + format_instances(infos)
    if args.command == "remove":
        request = admin_pb2.RemoveRequest(id=args.id)
        if args.wait is not None:
            request.wait_s = args.wait
        call(stub.Remove, request)
        return [json.dumps({"removed": args.id})] if args.json else [f"removed {args.id}"]
    if args.command == "policy":
        reply = call(stub.SetPolicy, admin_pb2.SetPolicyRequest(name=args.name))
        return [json.dumps({"policy": reply.policy})] if args.json else [f"policy: {reply.policy}"]
    if args.command == "add":
        request = admin_pb2.AddRequest(role=role_from_name(args.role).value, endpoint=args.endpoint)
        msg = call(stub.Add, request).instance
    elif args.command == "drain":
        msg = call(stub.Drain, admin_pb2.DrainRequest(id=args.id)).instance
    elif args.command == "set-role":
        request = admin_pb2.SetRoleRequest(id=args.id, role=role_from_name(args.role).value)
        set_role_reply = call(stub.SetRole, request)
        info = instance_from_proto(set_role_reply.instance)
        planned = list(set_role_reply.planned)
        if args.json:
            if planned:
                return [json.dumps({"planned": planned, "instance": instance_json(info)})]
            return [json.dumps(instance_json(info))]
        if not info.id:  # a pool member: the new pod is not known yet (detail says where)
            return [*format_planned(planned), f"{role_name(info.role)}: {info.detail}"]
        return format_planned(planned) + format_instances([info])
    else:  # pragma: no cover - argparse only lets the commands above through
        raise AssertionError(args.command)
    info = instance_from_proto(msg)
    return [json.dumps(instance_json(info))] if args.json else format_instances([info])


def resolve_token(token: str | None, token_file: str | None, environ: Mapping[str, str]) -> str:
    """--token, else --token-file, else $STRATA_ADMIN_TOKEN, else `strata serve`'s token file
    if it exists, else "" (no token). Raises TokenFileError for a --token-file that cannot be
    used."""
    if token is not None:
        return token
    if token_file is not None:
        return read_token_file(Path(token_file))
    if environ.get(ADMIN_TOKEN_ENV):
        return environ[ADMIN_TOKEN_ENV]
    default = default_token_path()
    if not default.exists():
        return ""
    try:
        return read_token_file(default)
    except TokenFileError as exc:  # not asked for: go on without a token (UNAUTHENTICATED)
        print(f"strata admin: ignoring {exc}", file=sys.stderr)
        return ""


def cluster_auth(args: argparse.Namespace) -> ClientAuth | None:
    """The caller's cluster credentials: its TLS files (TLS mode; the server requires them),
    else ``admin/NAME`` with the cluster key, else None. CredentialError says what is wrong."""
    files = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(files):
        tls = TlsConfig(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)
        return ClientAuth.from_tls(tls, None)  # another role's certificate: the token decides
    if args.cluster_key_file is None:
        return None
    name = args.name or os.environ.get("USER") or "operator"
    return ClientAuth(read_cluster_key(Path(args.cluster_key_file)), Identity("admin", name))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    address = args.address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    try:
        parse_endpoint(address)
    except EndpointError as exc:
        parser.error(f"--address: {exc}")
    try:
        auth = cluster_auth(args)
        explicit = args.token is not None or args.token_file is not None
        token = resolve_token(args.token, args.token_file, os.environ)
    except (TokenFileError, CredentialError) as exc:
        parser.error(str(exc))
    if auth is not None and not explicit:
        token = ""  # cluster credentials prove admin/NAME: no token from the environment
    # With no token the call is still made: a server that allows unauthenticated loopback access
    # answers it, any other answers UNAUTHENTICATED (exit 3).
    metadata = [("authorization", f"Bearer {token}")] if token else []
    if auth is not None and auth.tls is None and token:
        auth = None  # an explicit token: it alone decides
    closing, channel = blocking_channel(address, auth)
    try:
        with closing:
            lines = _run(args, admin_pb2_grpc.AdminStub(channel), metadata)
    except grpc.RpcError as exc:
        code = exc.code()
        detail = (exc.details() or "").splitlines()[0] if exc.details() else ""
        if code is grpc.StatusCode.UNAVAILABLE:
            detail = f"cannot reach the gateway's admin API at {address}"
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
            detail = f"no answer from {address} within {args.timeout:g} s"
        print(f"strata admin {args.command}: {code.name}: {detail}", file=sys.stderr)
        return exit_code_for(code)
    except ValueError as exc:  # a reply this client cannot read (a newer server)
        print(f"strata admin {args.command}: unreadable reply: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for line in lines:
        print(line)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
