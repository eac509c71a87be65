"""Exact tests of the one HOST:PORT parser (strata_common.endpoints)."""

from __future__ import annotations

import pytest

from strata_common.endpoints import (
    Endpoint,
    EndpointError,
    bind_port,
    format_endpoint,
    is_wildcard,
    parse_endpoint,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("localhost:1", ("localhost", 1)),
        ("worker-3.pool.svc:65535", ("worker-3.pool.svc", 65535)),
        ("[::1]:9000", ("::1", 9000)),
        ("[fe80::1]:50051", ("fe80::1", 50051)),
    ],
)
def test_parse_endpoint_accepts(text: str, expected: tuple[str, int]) -> None:
    endpoint = parse_endpoint(text)
    assert endpoint == expected
    assert isinstance(endpoint, Endpoint)
    assert format_endpoint(*expected) == text
    assert str(endpoint) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "127.0.0.1",
        ":8000",
        "127.0.0.1:",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:80a",
        "127.0.0.1:٣٣",  # non-ASCII digits
        "::1:9000",
        "[::1]9000",
        "[127.0.0.1]:9000",
        "[nope]:9000",
        "bad host:9000",
        "-dash:9000",
        "host/path:9000",
        "http://host:9000",
    ],
)
def test_parse_endpoint_refuses(text: str) -> None:
    with pytest.raises(EndpointError, match="endpoint"):
        parse_endpoint(text)


def test_port_zero_only_where_allowed() -> None:
    assert parse_endpoint("0.0.0.0:0", allow_zero=True) == ("0.0.0.0", 0)
    with pytest.raises(EndpointError, match=r"\[1, 65535\]"):
        parse_endpoint("0.0.0.0:0")


def test_endpoint_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_endpoint("nope")


def test_bind_port_answers_the_bound_port_or_one_error_naming_what_and_where() -> None:
    assert bind_port(lambda address: 7600, "[::1]:0", "the service") == 7600
    with pytest.raises(OSError, match=r"^cannot bind the service to h:1$"):
        bind_port(lambda address: 0, "h:1", "the service")

    def refuse(address: str) -> int:
        raise RuntimeError("in use")

    with pytest.raises(ValueError, match=r"^cannot bind the API to h:1: in use$") as caught:
        bind_port(refuse, "h:1", "the API", ValueError)
    assert isinstance(caught.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("host", "wildcard"),
    [
        ("0.0.0.0", True),
        ("::", True),
        ("[::]", True),
        ("0:0::0", True),
        ("", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("10.0.0.7", False),
        ("worker-3.pool.svc", False),
    ],
)
def test_wildcard_addresses(host: str, wildcard: bool) -> None:
    assert is_wildcard(host) is wildcard
