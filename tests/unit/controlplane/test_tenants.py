"""controlplane/tenants.py: API keys to tenants, and each tenant's KV namespace, exactly."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest

from controlplane.tenants import ANONYMOUS, ApiKeys, TenantError, tenant_namespace

KEY_A = "sk-aaaaaaaaaaaaaaaaaaaa"
KEY_B = "sk-bbbbbbbbbbbbbbbbbbbb"
SECRET = bytes(range(32))


def keys_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_without_keys_everyone_is_anonymous() -> None:
    keys = ApiKeys.load()
    assert not keys.required
    assert keys.tenant_of(None) == keys.tenant_of("Bearer whatever") == ANONYMOUS


def test_keys_map_to_tenants(tmp_path: Path) -> None:
    path = keys_file(tmp_path, f"# team keys\n{KEY_A} team-a\n\n{KEY_B}   team_b\n")
    keys = ApiKeys.load(["sk-cccccccccccccccccccc"], path)
    assert keys.required
    assert keys.tenant_of(f"Bearer {KEY_A}") == "team-a"
    assert keys.tenant_of(f"bearer  {KEY_B} ") == "team_b"
    tenant = "key-" + hashlib.sha256(b"sk-cccccccccccccccccccc").hexdigest()[:12]
    assert keys.tenant_of("Bearer sk-cccccccccccccccccccc") == tenant
    assert keys.tenants == {"team-a", "team_b", tenant}


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "didn't provide an API key"),
        ("", "didn't provide an API key"),
        (KEY_A, "Malformed"),
        ("Basic abc", "Malformed"),
        ("Bearer ", "Malformed"),
        ("Bearer sk-wrongwrongwrongwrong", "Incorrect API key"),
        (f"Bearer {KEY_A}x", "Incorrect API key"),
    ],
)
def test_missing_or_wrong_keys_are_refused(header: str | None, reason: str) -> None:
    keys = ApiKeys.load([KEY_A])
    with pytest.raises(TenantError, match=reason):
        keys.tenant_of(header)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (f"{KEY_A}\n", "expected `KEY TENANT`"),
        (f"{KEY_A} a b\n", "expected `KEY TENANT`"),
        ("short team\n", "at least 16"),
        (f"{KEY_A} bad/tenant\n", "a tenant name"),
        (f"{KEY_A} a\n{KEY_A} b\n", "two tenants"),
        ("", "holds no API keys"),  # an empty file must not leave the API open
        ("# nobody yet\n\n", "holds no API keys"),
    ],
)
def test_a_bad_keys_file_names_the_line(tmp_path: Path, text: str, reason: str) -> None:
    with pytest.raises(TenantError, match=reason):
        ApiKeys.load(keys_file=keys_file(tmp_path, text))


def test_a_keys_file_others_can_read_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TenantError, match="chmod 600"):
        ApiKeys.load(keys_file=keys_file(tmp_path, f"{KEY_A} a\n", 0o644))
    with pytest.raises(TenantError, match="--api-key"):
        ApiKeys.load(["short"])


def test_namespaces() -> None:
    ns_a = hmac.new(SECRET, b"team-a", hashlib.sha256).hexdigest()[:32]
    assert tenant_namespace(SECRET, "team-a", "") == ns_a
    assert tenant_namespace(SECRET, "team-a", "mine") == f"{ns_a}/mine"
    assert tenant_namespace(SECRET, "team-b", "") != ns_a
    assert tenant_namespace(bytes(32), "team-a", "") != ns_a  # another cluster's key
    assert tenant_namespace(SECRET, ANONYMOUS, "mine") == "~mine"
    # A keyless gateway's client cannot name a tenant's namespace as its salt.
    assert tenant_namespace(SECRET, ANONYMOUS, ns_a) != ns_a
    assert tenant_namespace(SECRET, ANONYMOUS, "") == ""
