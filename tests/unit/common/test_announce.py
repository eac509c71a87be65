"""Worker announcements (strata_common/announce.py): the exact stored form, and every way a
stored one is refused."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from strata_common.announce import (
    BAD_BOOT,
    BAD_ENDPOINT,
    BAD_MODEL,
    BAD_ROLE,
    MAX_ANNOUNCEMENT_BYTES,
    NOT_JSON,
    OTHER_KEY,
    TOO_LARGE,
    WILDCARD,
    AnnouncedRole,
    Announcement,
    AnnouncementError,
    _glob_escape,
    announcement_key,
    new_boot_id,
    open_announcement,
    seal_announcement,
)
from strata_common.records import BAD_MAC, NO_MAC, UNEXPECTED, RecordError, RecordSeal

K = bytes(range(32))
OTHER = bytes(range(1, 33))
NS = "strata"
ANN = Announcement("10.0.0.7:50051", AnnouncedRole.DECODE, "/models/tiny", "0123456789abcdef")
KEY = b"strata:registry:announce:10.0.0.7:50051"
BODY = (
    b'{"boot": "0123456789abcdef", "endpoint": "10.0.0.7:50051", "model": "/models/tiny", '
    b'"role": "decode"}'
)


def expected_mac(key: bytes, place: bytes, body: bytes) -> bytes:
    """docs/design/security.md §5.2, computed independently: the place is the Redis key."""
    k_records = hmac.new(key, b"strata/v1/records", hashlib.sha256).digest()
    message = b"strata-record/1"
    for part in (place, body):
        message += len(part).to_bytes(4, "big") + part
    return hmac.new(k_records, message, hashlib.sha256).hexdigest().encode()


def test_key_and_body_are_the_documented_form() -> None:
    assert announcement_key("10.0.0.7:50051") == KEY.decode()
    assert announcement_key("[::1]:7", "ns") == "ns:registry:announce:[::1]:7"
    assert ANN.to_json().encode() == BODY


def test_a_sealed_announcement_is_mac_colon_body_and_opens() -> None:
    stored = seal_announcement(RecordSeal(K), ANN, NS)
    assert stored == b"strata-mac1:" + expected_mac(K, KEY, BODY) + b":" + BODY
    assert open_announcement(RecordSeal(K), KEY, stored) == ANN
    assert open_announcement(RecordSeal(K), KEY.decode(), stored) == ANN


def test_without_a_key_the_body_is_stored_as_it_is() -> None:
    stored = seal_announcement(RecordSeal(None), ANN, NS)
    assert stored == BODY
    assert open_announcement(RecordSeal(None), KEY, stored) == ANN


@pytest.mark.parametrize(
    ("writer", "reader", "reason"),
    [
        (None, K, NO_MAC),  # forged by someone without the key (or a worker not given it)
        (OTHER, K, BAD_MAC),  # another cluster's key
        (K, None, UNEXPECTED),  # a gateway without the key cannot check it
    ],
)
def test_a_seal_that_does_not_match_the_reader_is_refused(
    writer: bytes | None, reader: bytes | None, reason: str
) -> None:
    stored = seal_announcement(RecordSeal(writer), ANN, NS)
    with pytest.raises(RecordError) as caught:
        open_announcement(RecordSeal(reader), KEY, stored)
    assert str(caught.value) == reason


def test_a_tampered_announcement_is_refused() -> None:
    stored = seal_announcement(RecordSeal(K), ANN, NS)
    tampered = stored.replace(b'"decode"', b'"prefill"')
    assert tampered != stored
    with pytest.raises(RecordError) as caught:
        open_announcement(RecordSeal(K), KEY, tampered)
    assert str(caught.value) == BAD_MAC


def test_an_announcement_moved_to_another_key_is_refused() -> None:
    other_key = b"strata:registry:announce:10.0.0.8:50051"
    stored = seal_announcement(RecordSeal(K), ANN, NS)
    with pytest.raises(RecordError) as caught:
        open_announcement(RecordSeal(K), other_key, stored)
    assert str(caught.value) == BAD_MAC
    # Without MACs the body's endpoint must still be the key's.
    with pytest.raises(AnnouncementError) as not_sealed:
        open_announcement(RecordSeal(None), other_key, BODY)
    assert str(not_sealed.value) == OTHER_KEY
    # ... and the namespace is part of the key.
    with pytest.raises(AnnouncementError) as other_ns:
        open_announcement(RecordSeal(None), b"other:registry:announce:10.0.0.7:50051", BODY)
    assert str(other_ns.value) == OTHER_KEY
    moved = b"other:registry:announce:10.0.0.7:50051"
    assert open_announcement(RecordSeal(None), moved, BODY, "other") == ANN


def test_an_oversize_value_is_refused_before_its_mac_is_checked() -> None:
    body = json.dumps({**json.loads(BODY), "pad": "x" * MAX_ANNOUNCEMENT_BYTES}).encode()
    stored = RecordSeal(K).seal((KEY,), body)  # a valid MAC: the size alone refuses it
    with pytest.raises(AnnouncementError) as caught:
        open_announcement(RecordSeal(K), KEY, stored)
    assert str(caught.value) == TOO_LARGE
    just_fits = BODY[:-1] + b', "pad": "' + b"x" * (4096 - 77 - len(BODY) - 11) + b'"}'
    stored = RecordSeal(K).seal((KEY,), just_fits)
    assert len(stored) == MAX_ANNOUNCEMENT_BYTES
    assert open_announcement(RecordSeal(K), KEY, stored) == ANN  # unknown fields are ignored


def test_a_worker_cannot_write_an_oversize_announcement() -> None:
    fits = Announcement("10.0.0.7:50051", AnnouncedRole.DECODE, "m" * 1024, "b")
    assert len(seal_announcement(RecordSeal(K), fits, NS)) == 77 + len(fits.to_json()) == 1175
    # 1024 characters, each escaped to six in JSON (\u0001)
    big = Announcement("10.0.0.7:50051", AnnouncedRole.DECODE, "\x01" * 1024, "b")
    with pytest.raises(ValueError) as caught:
        seal_announcement(RecordSeal(K), big, NS)
    assert str(caught.value) == f"announcement of {77 + 6 * 1024 + 74} bytes: {TOO_LARGE}"


def _body(**fields: object) -> dict[str, object]:
    return {**json.loads(BODY), **fields}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", NOT_JSON),
        (b"\xff\xfe", NOT_JSON),
        (b"[" * 3000, NOT_JSON),  # nesting past the recursion limit: refused, not fatal
        (b'["10.0.0.7:50051"]', NOT_JSON),
        (_body(role="both-ish"), BAD_ROLE),
        (_body(role="BOTH"), BAD_ROLE),
        (_body(role=None), BAD_ROLE),
        (_body(role=2), BAD_ROLE),
        (_body(endpoint=None), BAD_ENDPOINT),
        (_body(endpoint=50051), BAD_ENDPOINT),
        (_body(endpoint="10.0.0.7"), BAD_ENDPOINT),
        (_body(endpoint="10.0.0.7:0"), BAD_ENDPOINT),
        (_body(endpoint="10.0.0.7:99999"), BAD_ENDPOINT),
        (_body(endpoint=" 10.0.0.7:50051"), BAD_ENDPOINT),  # not canonical: two keys for one
        (_body(endpoint="::1:50051"), BAD_ENDPOINT),
        (_body(endpoint="0.0.0.0:50051"), WILDCARD),
        (_body(endpoint="[::]:50051"), WILDCARD),
        (_body(model=7), BAD_MODEL),
        (_body(model="m" * 1025), BAD_MODEL),
        (_body(boot=""), BAD_BOOT),
        (_body(boot="a b"), BAD_BOOT),
        (_body(boot="b" * 65), BAD_BOOT),
        (_body(boot=None), BAD_BOOT),
    ],
)
def test_each_field_is_validated(body: bytes | dict[str, object], reason: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    # The endpoint in the key matches the body where the body has one, so the field is the
    # reason and not the key.
    endpoint = body.get("endpoint") if isinstance(body, dict) else None
    key = announcement_key(endpoint if isinstance(endpoint, str) else "10.0.0.7:50051")
    stored = RecordSeal(K).seal((key,), raw)
    with pytest.raises(AnnouncementError) as caught:
        open_announcement(RecordSeal(K), key, stored)
    assert str(caught.value) == reason


def test_roles_and_hosts_that_are_accepted() -> None:
    for role in ("prefill", "decode", "both"):
        for endpoint in ("worker-3.pool.svc:50051", "[fd00::7]:50051", "10.1.2.3:1"):
            raw = json.dumps(_body(role=role, endpoint=endpoint)).encode()
            key = announcement_key(endpoint)
            got = open_announcement(RecordSeal(K), key, RecordSeal(K).seal((key,), raw))
            assert (got.role.value, got.endpoint) == (role, endpoint)


def test_a_worker_cannot_make_a_bad_announcement() -> None:
    with pytest.raises(AnnouncementError) as caught:
        Announcement("0.0.0.0:50051", AnnouncedRole.PREFILL, "m", "b")
    assert str(caught.value) == WILDCARD
    with pytest.raises(ValueError, match="boot"):
        Announcement("10.0.0.7:50051", AnnouncedRole.PREFILL, "m", "a b")


def test_boot_ids_are_fresh_and_valid() -> None:
    first, second = new_boot_id(), new_boot_id()
    assert first != second and len(first) == 16
    Announcement("10.0.0.7:50051", AnnouncedRole.BOTH, "m", first)


def test_the_scan_pattern_matches_the_prefix_literally() -> None:
    assert _glob_escape("strata:registry:announce:") == "strata:registry:announce:"
    assert _glob_escape("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"
