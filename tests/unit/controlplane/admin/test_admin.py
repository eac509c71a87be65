"""Admin API pieces that need no server: config rules, endpoint parsing, the token check, the
protobuf conversions, and the CLI's formatting and exit codes."""

from __future__ import annotations

import grpc
import pytest

from controlplane.admin.auth import token_matches
from controlplane.admin.config import (
    ADMIN_TOKEN_ENV,
    MIN_TOKEN_CHARS,
    AdminConfig,
    AdminConfigError,
)
from controlplane.admin.convert import (
    check_endpoint,
    instance_from_proto,
    instance_to_proto,
    role_from_name,
    stats_from_proto,
    stats_to_proto,
)
from controlplane.instances.types import (
    ClusterStats,
    InstanceInfo,
    InstanceState,
    InvalidAdminRequest,
)
from controlplane.workers.roles import WorkerRole, role_name
from strata import admin_cli

TOKEN = "0123456789abcdef-token"

# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, "no admin token"),
        ({"host": "0.0.0.0"}, "no admin token"),
        ({"allow_unauthenticated": True, "host": "0.0.0.0"}, "only allowed on a loopback"),
        ({"allow_unauthenticated": True, "host": "10.1.2.3"}, "only allowed on a loopback"),
        ({"allow_unauthenticated": True, "host": "gateway.example"}, "only allowed on a loopback"),
        ({"token": TOKEN, "allow_unauthenticated": True}, "choose one"),
        ({"token": "x" * (MIN_TOKEN_CHARS - 1)}, f"at least {MIN_TOKEN_CHARS} characters"),
        ({"token": "0123456789 abcdef"}, "without whitespace"),
        ({"token": TOKEN, "port": 65536}, "admin port"),
        ({"token": TOKEN, "port": -1}, "admin port"),
        ({"token": TOKEN, "host": ""}, "host must not be empty"),
    ],
)
def test_config_refuses_insecure_or_malformed_settings(
    kwargs: dict[str, object], error: str
) -> None:
    with pytest.raises(AdminConfigError, match=error):
        AdminConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.9.9", "::1", "localhost"])
def test_config_allows_no_token_only_on_loopback(host: str) -> None:
    config = AdminConfig(host=host, allow_unauthenticated=True)
    assert not config.requires_token


@pytest.mark.parametrize(
    ("configured", "environ", "expected"),
    [
        (TOKEN, {ADMIN_TOKEN_ENV: "from-the-environment-0123"}, TOKEN),
        (None, {ADMIN_TOKEN_ENV: "from-the-environment-0123"}, "from-the-environment-0123"),
        ("", {ADMIN_TOKEN_ENV: "from-the-environment-0123"}, "from-the-environment-0123"),
    ],
)
def test_resolve_prefers_the_config_token_then_the_environment(
    configured: str | None, environ: dict[str, str], expected: str
) -> None:
    assert AdminConfig.resolve(token=configured, environ=environ).token == expected


def test_resolve_with_an_empty_environment_variable_has_no_token() -> None:
    with pytest.raises(AdminConfigError, match="no admin token"):
        AdminConfig.resolve(environ={ADMIN_TOKEN_ENV: ""})
    config = AdminConfig.resolve(environ={ADMIN_TOKEN_ENV: ""}, allow_unauthenticated=True)
    assert config.token is None


# -- endpoints and roles ---------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "127.0.0.1", "127.0.0.1:0", "::1:9000", "bad host:9000"])
def test_bad_endpoint_is_an_invalid_admin_request(text: str) -> None:
    """The parser itself: tests/unit/common/test_endpoints.py; here, that the admin API maps its
    error to InvalidAdminRequest (INVALID_ARGUMENT)."""
    with pytest.raises(InvalidAdminRequest, match="endpoint"):
        check_endpoint(text)


def test_good_endpoint_is_returned_in_its_canonical_form() -> None:
    assert check_endpoint("[::1]:9000") == "[::1]:9000"
    assert check_endpoint(" h:1 ") == "h:1"


@pytest.mark.parametrize(
    ("name", "role"),
    [("prefill", WorkerRole.PREFILL), ("decode", WorkerRole.DECODE), ("BOTH", WorkerRole.BOTH)],
)
def test_role_names(name: str, role: WorkerRole) -> None:
    assert role_from_name(name) is role
    assert role_name(role) == name.lower()


@pytest.mark.parametrize("name", ["", "unspecified", "prefil", "worker"])
def test_unknown_role_names(name: str) -> None:
    with pytest.raises(InvalidAdminRequest, match="unknown role"):
        role_from_name(name)


# -- token check -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "ok"),
    [
        ([("authorization", f"Bearer {TOKEN}")], True),
        ([("authorization", f"bearer {TOKEN}")], True),
        ([("user-agent", "x"), ("authorization", f"Bearer  {TOKEN} ")], True),
        ([], False),
        ([("authorization", "Bearer ")], False),
        ([("authorization", f"Bearer {TOKEN}x")], False),
        ([("authorization", f"Bearer {TOKEN[:-1]}")], False),
        ([("authorization", TOKEN)], False),
        ([("authorization", f"Token {TOKEN}")], False),
        ([("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")], False),
        ([("authorization", f"Bearer {TOKEN}".encode())], False),
    ],
)
def test_token_matches(metadata: list[tuple[str, str | bytes]], ok: bool) -> None:
    assert token_matches(metadata, TOKEN) is ok


# -- conversions -----------------------------------------------------------------------------

INSTANCE = InstanceInfo(
    id="decode-7",
    role=WorkerRole.DECODE,
    state=InstanceState.DRAINING,
    endpoint="127.0.0.1:9001",
    model="tiny",
    block_size=128,
    capacity=32,
    in_flight=8,
    load=0.25,
    launched=True,
    detail="scale 2 -> 1",
)


@pytest.mark.parametrize("state", list(InstanceState))
def test_instance_round_trips_through_protobuf(state: InstanceState) -> None:
    info = InstanceInfo(id="i", role=WorkerRole.BOTH, state=state, endpoint="h:1")
    assert instance_from_proto(instance_to_proto(info)) == info
    assert instance_from_proto(instance_to_proto(INSTANCE)) == INSTANCE


@pytest.mark.parametrize(("ttft", "tpot"), [(None, None), (0.125, 0.0), (0.0, 0.5)])
def test_stats_round_trip_through_protobuf(ttft: float | None, tpot: float | None) -> None:
    stats = ClusterStats(
        policy="slo_aware",
        instances=(INSTANCE,),
        requests_total=10,
        requests_rejected=2,
        requests_failed_over=1,
        predictor_ttft_mape=ttft,
        predictor_tpot_mape=tpot,
        extra={"x": 1.5},
    )
    assert stats_from_proto(stats_to_proto(stats)) == stats


# -- CLI formatting and exit codes -----------------------------------------------------------


def test_list_lines_are_aligned_one_per_instance() -> None:
    infos = [
        INSTANCE,
        InstanceInfo(
            id="prefill-10", role=WorkerRole.PREFILL, state=InstanceState.READY, endpoint="[::1]:80"
        ),
    ]
    assert admin_cli.format_instances(infos) == [
        "ID          ROLE     STATE     ENDPOINT        LOAD",
        "decode-7    decode   draining  127.0.0.1:9001  0.25 (8/32)",
        "prefill-10  prefill  ready     [::1]:80        0/?",
    ]


def test_planned_lines() -> None:
    """A dry-run gateway's planned writes lead the CLI's output; none, nothing."""
    assert admin_cli.format_planned([]) == []
    assert admin_cli.format_planned(["PUT /a {}", "PATCH /b {}"]) == [
        "dry run: nothing changed; the gateway's launcher would send:",
        "  PUT /a {}",
        "  PATCH /b {}",
        "",
    ]


def test_stats_lines() -> None:
    stats = ClusterStats(
        policy="prefix_aware",
        instances=(INSTANCE,),
        requests_total=10,
        requests_rejected=2,
        requests_failed_over=1,
        predictor_ttft_mape=0.125,
        extra={"decisions_per_s": 250.0},
    )
    assert admin_cli.format_stats(stats) == [
        "policy: prefix_aware",
        "requests: 10 total, 2 rejected, 1 failed over",
        "predictor MAPE: TTFT 12.5 %, TPOT n/a",
        "decisions_per_s: 250",
        "",
        "ID        ROLE    STATE     ENDPOINT        LOAD",
        "decode-7  decode  draining  127.0.0.1:9001  0.25 (8/32)",
    ]


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 2),
        (grpc.StatusCode.UNAUTHENTICATED, 3),
        (grpc.StatusCode.PERMISSION_DENIED, 3),
        (grpc.StatusCode.NOT_FOUND, 4),
        (grpc.StatusCode.ALREADY_EXISTS, 5),
        (grpc.StatusCode.FAILED_PRECONDITION, 5),
        (grpc.StatusCode.UNAVAILABLE, 6),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 6),
        (grpc.StatusCode.INTERNAL, 1),
        (grpc.StatusCode.UNKNOWN, 1),
    ],
)
def test_exit_codes(code: grpc.StatusCode, exit_code: int) -> None:
    assert admin_cli.exit_code_for(code) == exit_code


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["scale", "--role", "both", "--replicas", "1"],
        ["scale", "--role", "decode", "--replicas", "two"],
        ["add", "--role", "worker", "--endpoint", "h:1"],
        ["add", "--role", "decode"],
        ["set-role", "decode-1", "--role", "x"],
        ["remove", "decode-1", "--wait", "soon"],
        ["--address", "no-port", "list"],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        admin_cli.main(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip()
