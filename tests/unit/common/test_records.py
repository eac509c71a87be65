"""Sealed Redis records (strata_common/records.py): the exact format, and every way to fail."""

from __future__ import annotations

import hashlib
import hmac
import logging

import pytest

from strata_common.records import (
    SEAL_HEADER_BYTES,
    SEAL_PREFIX,
    RecordError,
    RecordSeal,
    SkippedRecords,
)

K = bytes(range(32))
OTHER = bytes(range(1, 33))
PLACE = ("strata:registry:instances", "w3")
BODY = b'{"id": "w3"}'


def expected_mac(key: bytes, parts: list[bytes], body: bytes) -> bytes:
    """The MAC as docs/design/security.md §5.2 defines it, computed independently."""
    k_records = hmac.new(key, b"strata/v1/records", hashlib.sha256).digest()
    message = b"strata-record/1"
    for part in [*parts, body]:
        message += len(part).to_bytes(4, "big") + part
    return hmac.new(k_records, message, hashlib.sha256).hexdigest().encode()


def test_seal_is_the_documented_format() -> None:
    sealed = RecordSeal(K).seal(PLACE, BODY)
    mac = expected_mac(K, [b"strata:registry:instances", b"w3"], BODY)
    assert sealed == b"strata-mac1:" + mac + b":" + BODY
    assert SEAL_HEADER_BYTES == len(b"strata-mac1:") + 64 + 1 == 77
    assert sealed[SEAL_HEADER_BYTES:] == BODY
    assert RecordSeal(K).seal(PLACE, BODY.decode()) == sealed  # str bodies are UTF-8
    assert RecordSeal(K).seal([p.encode() for p in PLACE], BODY) == sealed  # bytes places too


def test_open_returns_the_exact_body() -> None:
    seal = RecordSeal(K)
    assert seal.open(PLACE, seal.seal(PLACE, BODY)) == BODY
    binary = b"\x01\x00\xff:" + SEAL_PREFIX  # any bytes (stream messages are binary)
    assert seal.open(("s",), seal.seal(("s",), binary)) == binary
    assert seal.open(("s",), seal.seal(("s",), b"")) == b""


def _upper_mac(sealed: bytes) -> bytes:
    return sealed[:12] + sealed[12:76].upper() + sealed[76:]


@pytest.mark.parametrize(
    ("stored", "reason"),
    [
        (BODY, "no MAC (written without the cluster key?)"),
        (b"", "no MAC (written without the cluster key?)"),
        (SEAL_PREFIX + b"00" * 32, "malformed MAC"),  # no separator
        (SEAL_PREFIX + b"00" * 32 + b";" + BODY, "malformed MAC"),
        (SEAL_PREFIX + b"ab:" + BODY, "malformed MAC"),
        (SEAL_PREFIX + b"00" * 32 + b":" + BODY, "wrong MAC"),
        (RecordSeal(OTHER).seal(PLACE, BODY), "wrong MAC"),  # another cluster key
        (RecordSeal(K).seal(("strata:registry:instances", "w4"), BODY), "wrong MAC"),  # moved
        (RecordSeal(K).seal(("other:registry:instances", "w3"), BODY), "wrong MAC"),
        (RecordSeal(K).seal(PLACE, BODY).replace(b"w3", b"w4"), "wrong MAC"),  # tampered
        (_upper_mac(RecordSeal(K).seal(PLACE, BODY)), "wrong MAC"),  # lower-case hex only
        (RecordSeal(K).seal(PLACE, BODY) + b" ", "wrong MAC"),
    ],
)
def test_open_refuses(stored: bytes, reason: str) -> None:
    with pytest.raises(RecordError) as info:
        RecordSeal(K).open(PLACE, stored)
    assert str(info.value).startswith(reason)
    assert isinstance(info.value, ValueError)


def test_a_record_longer_than_its_kind_is_refused_before_its_mac() -> None:
    seal = RecordSeal(K)
    exact = seal.seal(PLACE, BODY)
    assert seal.open(PLACE, exact, max_body_bytes=len(BODY)) == BODY  # the limit is inclusive
    with pytest.raises(RecordError, match="larger than any record of its kind"):
        seal.open(PLACE, exact, max_body_bytes=len(BODY) - 1)
    huge = SEAL_PREFIX + b"00" * 32 + b":" + b"x" * (1 << 20)  # refused unread, MAC or not
    with pytest.raises(RecordError, match="larger than any record of its kind"):
        seal.open(PLACE, huge, max_body_bytes=4096)
    with pytest.raises(RecordError, match="larger than any record of its kind"):
        RecordSeal(None).open(PLACE, b"x" * 5000, max_body_bytes=4096)  # without a key too


def test_places_are_unambiguous() -> None:
    seal = RecordSeal(K)
    assert seal.seal(("ab", "c"), BODY) != seal.seal(("a", "bc"), BODY)
    assert seal.seal(("a",), b"bc") != seal.seal(("a", "b"), b"c")
    with pytest.raises(RecordError, match="wrong MAC"):
        seal.open(("a", "bc"), seal.seal(("ab", "c"), BODY))


def test_without_a_key_records_stay_as_they_are() -> None:
    plain = RecordSeal(None)
    assert not plain.enabled and RecordSeal(K).enabled
    assert plain.seal(PLACE, BODY) == BODY
    assert plain.open(PLACE, BODY) == BODY
    assert plain.open(PLACE, BODY.decode()) == BODY
    with pytest.raises(
        RecordError,
        match=r"^sealed with a cluster key, but this process has none \(--cluster-key-file\)$",
    ):
        plain.open(PLACE, RecordSeal(K).seal(PLACE, BODY))


def test_the_key_never_shows_and_must_be_a_cluster_key() -> None:
    assert repr(RecordSeal(K)) == "RecordSeal(sealed)"
    assert repr(RecordSeal(None)) == "RecordSeal(no MACs)"
    with pytest.raises(ValueError, match="32 bytes"):
        RecordSeal(b"short")


def test_skipped_records_log_once_per_key_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    skipped = SkippedRecords(logging.getLogger("test.records"), "member record")
    with caplog.at_level(logging.WARNING, logger="test.records"):
        for _ in range(3):
            skipped.note(b"a", "no MAC")
            skipped.note(b"b", "wrong MAC")
            skipped.forget_except([b"a", b"b"])
        skipped.note(b"a", "wrong MAC")  # a new reason: logged
        skipped.forget_except([b"a"])  # b was fixed or deleted
        skipped.note(b"b", "wrong MAC")  # bad again: logged again
        skipped.forget_except([b"a", b"b"])
    assert [r.getMessage() for r in caplog.records] == [
        "skipping the member record under b'a': no MAC",
        "skipping the member record under b'b': wrong MAC",
        "skipping the member record under b'a': wrong MAC",
        "skipping the member record under b'b': wrong MAC",
    ]
    assert skipped.skipped == {b"a": "wrong MAC", b"b": "wrong MAC"}
