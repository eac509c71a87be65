"""`strata admin ...` as a real subprocess against a real admin service (FakeAdminBackend, a test
double, behind it): output, --json, the token from --token or STRATA_ADMIN_TOKEN, and one-line
errors with their documented exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from controlplane.admin.config import AdminConfig
from tests.conftest import REPO_ROOT
from tests.integration.controlplane.admin_harness import (
    TOKEN,
    Admin,
    start_admin,
    stop_admin,
)
from tests.integration.controlplane.conftest import LoopThread


@dataclass
class Result:
    code: int
    out: str
    err: str


def strata_admin(
    address: str, *args: str, token: str | None = TOKEN, env_token: str = ""
) -> Result:
    argv = [sys.executable, "-m", "strata", "admin", "--address", address]
    if token is not None:
        argv += ["--token", token]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_ADMIN_")}
    if env_token:
        env["STRATA_ADMIN_TOKEN"] = env_token
    proc = subprocess.run(
        [*argv, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def admin(loop_thread: LoopThread) -> Iterator[Admin]:
    a = start_admin(loop_thread, AdminConfig(host="127.0.0.1", port=0, token=TOKEN))
    yield a
    stop_admin(a)


@pytest.fixture
def address(admin: Admin) -> str:
    return f"127.0.0.1:{admin.server.port}"


def test_add_list_and_json(admin: Admin, address: str) -> None:
    r = strata_admin(address, "add", "--role", "prefill", "--endpoint", "127.0.0.1:9001")
    assert (r.code, r.err) == (0, "")
    assert r.out.splitlines() == [
        "ID         ROLE     STATE     ENDPOINT        LOAD",
        "prefill-1  prefill  starting  127.0.0.1:9001  0/?",
    ]
    assert strata_admin(address, "add", "--role", "decode", "--endpoint", "[::1]:9002").code == 0
    r = strata_admin(address, "list")
    assert r.out.splitlines() == [
        "ID         ROLE     STATE     ENDPOINT        LOAD",
        "decode-2   decode   starting  [::1]:9002      0/?",
        "prefill-1  prefill  starting  127.0.0.1:9001  0/?",
    ]
    r = strata_admin(address, "--json", "list")
    assert r.code == 0
    assert [(i["id"], i["role"], i["state"], i["endpoint"]) for i in json.loads(r.out)] == [
        ("decode-2", "decode", "starting", "[::1]:9002"),
        ("prefill-1", "prefill", "starting", "127.0.0.1:9001"),
    ]


def test_token_from_the_environment(admin: Admin, address: str) -> None:
    r = strata_admin(address, "list", token=None, env_token=TOKEN)
    assert (r.code, r.out.splitlines()) == (0, ["ID  ROLE  STATE  ENDPOINT  LOAD"])


def test_drain_remove_set_role(admin: Admin, address: str) -> None:
    strata_admin(address, "add", "--role", "decode", "--endpoint", "127.0.0.1:9001")
    r = strata_admin(address, "--json", "drain", "decode-1")
    assert (r.code, json.loads(r.out)["state"]) == (0, "draining")
    r = strata_admin(address, "--json", "set-role", "decode-1", "--role", "both")
    assert (r.code, json.loads(r.out)["role"]) == (0, "both")
    r = strata_admin(address, "remove", "decode-1", "--wait", "1.5")
    assert (r.code, r.out) == (0, "removed decode-1\n")
    assert admin.backend.calls[-1] == ("remove", ("decode-1", 1.5))
    assert admin.backend.instances == {}


def test_scale_policy_and_stats(admin: Admin, address: str) -> None:
    r = strata_admin(address, "scale", "--role", "decode", "--replicas", "2")
    assert r.code == 0
    assert [line.split()[0] for line in r.out.splitlines()] == ["ID", "decode-1", "decode-2"]
    r = strata_admin(address, "policy", "least_loaded")
    assert (r.code, r.out) == (0, "policy: least_loaded\n")
    r = strata_admin(address, "stats")
    assert r.code == 0
    assert r.out.splitlines()[:4] == [
        "policy: least_loaded",
        "requests: 12 total, 3 rejected, 1 failed over",
        "predictor MAPE: TTFT 12.5 %, TPOT n/a",
        "decisions_per_s: 250",
    ]
    stats = json.loads(strata_admin(address, "--json", "stats").out)
    assert stats["policy"] == "least_loaded"
    assert [i["id"] for i in stats["instances"]] == ["decode-1", "decode-2"]
    assert stats["predictor_tpot_mape"] is None


@pytest.mark.parametrize(
    ("args", "token", "exit_code", "message"),
    [
        (("list",), None, 3, "strata admin list: UNAUTHENTICATED: missing or wrong admin token"),
        (("list",), "wrong-token-0123456789", 3, "strata admin list: UNAUTHENTICATED:"),
        (
            ("scale", "--role", "decode", "--replicas", "-1"),
            TOKEN,
            2,
            "strata admin scale: INVALID_ARGUMENT: replicas must be in [0, 64], got -1",
        ),
        (
            ("add", "--role", "decode", "--endpoint", "127.0.0.1:0"),
            TOKEN,
            2,
            "strata admin add: INVALID_ARGUMENT: endpoint port must be in [1, 65535]",
        ),
        (("remove", "x-1", "--wait", "-2"), TOKEN, 2, "INVALID_ARGUMENT: wait_s must be in"),
        (("policy", "fastest"), TOKEN, 2, "INVALID_ARGUMENT: unknown policy 'fastest'"),
        (("drain", "decode-9"), TOKEN, 4, "strata admin drain: NOT_FOUND: no instance 'decode-9'"),
        (("remove", "decode-9"), TOKEN, 4, "NOT_FOUND"),
        (("set-role", "decode-9", "--role", "prefill"), TOKEN, 4, "NOT_FOUND"),
    ],
)
def test_errors_are_one_line_with_their_exit_code(
    admin: Admin,
    address: str,
    args: tuple[str, ...],
    token: str | None,
    exit_code: int,
    message: str,
) -> None:
    r = strata_admin(address, *args, token=token)
    assert r.code == exit_code, r.err
    assert r.out == ""
    assert len(r.err.splitlines()) == 1
    assert message in r.err, r.err


def test_conflict_exits_5(admin: Admin, address: str) -> None:
    strata_admin(address, "add", "--role", "decode", "--endpoint", "127.0.0.1:9001")
    r = strata_admin(address, "add", "--role", "prefill", "--endpoint", "127.0.0.1:9001")
    assert (r.code, r.err) == (
        5,
        "strata admin add: ALREADY_EXISTS: 127.0.0.1:9001 is already registered\n",
    )


def test_internal_error_exits_1(admin: Admin, address: str) -> None:
    admin.backend.fail_with = RuntimeError("boom")
    r = strata_admin(address, "stats")
    assert (r.code, r.err) == (
        1,
        "strata admin stats: INTERNAL: Stats failed; see the gateway log\n",
    )


def test_unreachable_gateway_exits_6() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        r = strata_admin(f"127.0.0.1:{port}", "--timeout", "5", "list")
    assert r.code == 6
    assert r.err == (
        "strata admin list: UNAVAILABLE: "
        f"cannot reach the gateway's admin API at 127.0.0.1:{port}\n"
    )
