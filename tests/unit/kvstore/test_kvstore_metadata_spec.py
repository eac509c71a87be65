"""parse_metadata_spec: every metadata option is checked once, with a readable error."""

from __future__ import annotations

import pytest

from kvstore.metadata import MetadataSpec, open_metadata_store, parse_metadata_spec


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("embedded", MetadataSpec("embedded", "embedded")),
        (
            "redis://127.0.0.1:6379/0",
            MetadataSpec("redis://127.0.0.1:6379/0", "redis", "127.0.0.1", 6379),
        ),
        ("redis://cache", MetadataSpec("redis://cache", "redis", "cache", None)),
        (
            "rediss://:pw@host:6380/1",
            MetadataSpec("rediss://:pw@host:6380/1", "rediss", "host", 6380),
        ),
        ("REDIS://h:1", MetadataSpec("REDIS://h:1", "redis", "h", 1)),
        ("unix:///run/redis.sock", MetadataSpec("unix:///run/redis.sock", "unix")),
        (
            "strata://127.0.0.1:7000",
            MetadataSpec("strata://127.0.0.1:7000", "strata", "127.0.0.1", 7000),
        ),
        ("strata://[::1]:7000", MetadataSpec("strata://[::1]:7000", "strata", "::1", 7000)),
        (
            "strata://node-1:65535/",
            MetadataSpec("strata://node-1:65535/", "strata", "node-1", 65535),
        ),
    ],
)
def test_valid_specs(spec: str, expected: MetadataSpec) -> None:
    assert parse_metadata_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("", "metadata spec is empty; expected 'embedded', redis://"),
        ("127.0.0.1:6379", "metadata spec '127.0.0.1:6379' has no scheme; expected 'embedded'"),
        ("http://x:1", "unknown metadata scheme 'http://' in 'http://x:1'; expected 'embedded'"),
        ("zookeeper://x", "unknown metadata scheme 'zookeeper://'"),
        ("strata://h", "metadata spec 'strata://h' has no port (strata://HOST:PORT)"),
        ("strata://h:", "metadata spec 'strata://h:' has no port (strata://HOST:PORT)"),
        ("strata://[::1]", "metadata spec 'strata://[::1]' has no port"),
        ("strata://:7000", "metadata spec 'strata://:7000' has no host"),
        ("strata://", "metadata spec 'strata://' has no host"),
        ("strata://h:abc", "metadata spec 'strata://h:abc' has a bad port 'abc' (1..65535)"),
        ("strata://h:0", "metadata spec 'strata://h:0' has a bad port '0' (1..65535)"),
        ("strata://h:65536", "metadata spec 'strata://h:65536' has a bad port '65536'"),
        ("strata://h:-1", "metadata spec 'strata://h:-1' has a bad port '-1' (1..65535)"),
        (
            "strata://h:1/db",
            "metadata spec 'strata://h:1/db': nothing may follow strata://HOST:PORT",
        ),
        (
            "strata://u@h:1",
            "metadata spec 'strata://u@h:1': strata://HOST:PORT takes no user or password",
        ),
        ("redis://", "metadata spec 'redis://' has no host"),
        ("redis://h:99999/0", "metadata spec 'redis://h:99999/0' has a bad port '99999'"),
        ("redis://h:6379/x", "metadata spec 'redis://h:6379/x' has a bad database 'x' (a number)"),
        ("unix://", "metadata spec 'unix://' names no socket path (unix:///PATH)"),
        ("strata:// h:1", "metadata spec 'strata:// h:1' contains whitespace"),
    ],
)
def test_invalid_specs_get_a_readable_error(spec: str, error: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_metadata_spec(spec)
    assert str(caught.value).startswith(error)
    with pytest.raises(ValueError) as opened:  # open_metadata_store checks the same way
        open_metadata_store(spec)
    assert str(opened.value) == str(caught.value)


def test_shared_and_endpoint() -> None:
    assert parse_metadata_spec("embedded").shared is False
    assert parse_metadata_spec("redis://h:1/0").shared is True
    assert parse_metadata_spec("strata://[::1]:7000").endpoint == "[::1]:7000"
    with pytest.raises(ValueError, match="not a strata:// spec"):
        _ = parse_metadata_spec("redis://h:1/0").endpoint
