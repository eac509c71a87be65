"""strata_common/credentials.py: key files, derived keys, identities and the two proofs, exactly."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from strata_common.credentials import (
    CredentialError,
    Identity,
    check_rpc_authorization,
    derive_key,
    hello_proof,
    load_or_create_cluster_key,
    owner_only,
    read_cluster_key,
    rpc_authorization,
)

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
METHOD = "/strata.worker.v1.Worker/Prefill"


def test_the_key_file_is_created_once_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cluster.key"
    key, created = load_or_create_cluster_key(path)
    assert created and len(key) == 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_or_create_cluster_key(path) == (key, False)
    assert read_cluster_key(path) == key


def test_a_key_file_others_can_read_is_refused_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    path.write_text(KEY.hex() + "\n")
    path.chmod(0o644)
    with pytest.raises(CredentialError, match="chmod 600"):
        read_cluster_key(path)
    key, created = load_or_create_cluster_key(path)
    assert created and key != KEY and os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("text", "reason"), [("zz", "cannot read"), ("abcd", "32 bytes")])
def test_a_malformed_key_file_is_refused(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "cluster.key"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(CredentialError, match=reason):
        read_cluster_key(path)
    with pytest.raises(CredentialError, match="does not exist"):
        read_cluster_key(tmp_path / "absent")


def test_derived_keys_differ_by_purpose_and_key() -> None:
    keys = {derive_key(k, p) for k in (KEY, OTHER) for p in ("rpc", "store-hello", "records")}
    assert len(keys) == 6 and all(len(k) == 32 for k in keys)


def test_identities() -> None:
    worker = Identity.parse("worker/[::1]:7001")
    assert (worker.role, worker.name, str(worker)) == ("worker", "[::1]:7001", "worker/[::1]:7001")
    for bad in ("worker", "king/x", "worker/", "worker/a b", "worker/" + "x" * 200):
        with pytest.raises(CredentialError):
            Identity.parse(bad)


def test_hello_proofs_bind_side_identity_nonces_and_key() -> None:
    who = Identity("worker", "w1")
    base = hello_proof(KEY, "client", who, b"c" * 16, b"n" * 16)
    assert len(base) == 32
    variants = [
        hello_proof(KEY, "node", who, b"c" * 16, b"n" * 16),
        hello_proof(KEY, "client", Identity("worker", "w2"), b"c" * 16, b"n" * 16),
        hello_proof(KEY, "client", who, b"d" * 16, b"n" * 16),
        hello_proof(KEY, "client", who, b"c" * 16, b"m" * 16),
        hello_proof(OTHER, "client", who, b"c" * 16, b"n" * 16),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_rpc_authorization_round_trip_and_every_refusal() -> None:
    who = Identity("gateway", "g1")
    value = rpc_authorization(KEY, who, METHOD, now=1_000_000.7)
    assert value.startswith("Strata-HMAC id=gateway/g1, ts=1000000, mac=")
    assert check_rpc_authorization(KEY, value, METHOD, now=1_000_050.0) == who
    cases = {
        "no credentials": (KEY, None, METHOD, 1_000_000.0),
        "malformed": (KEY, "Bearer abc", METHOD, 1_000_000.0),
        "expired": (KEY, value, METHOD, 1_000_121.0),
        "wrong": (OTHER, value, METHOD, 1_000_000.0),
    }
    for reason, (key, presented, method, now) in cases.items():
        with pytest.raises(CredentialError, match=reason):
            check_rpc_authorization(key, presented, method, now)
    with pytest.raises(CredentialError, match="wrong"):  # a proof for another method
        check_rpc_authorization(KEY, value, "/strata.worker.v1.Worker/Decode", 1_000_000.0)
    forged = value.replace("gateway/g1", "gateway/g2")
    with pytest.raises(CredentialError, match="wrong"):
        check_rpc_authorization(KEY, forged, METHOD, 1_000_000.0)


def _owner_only_as(uid: int, gids: list[int], path: Path) -> bool:
    """``owner_only(path)`` with effective user ``uid`` and groups ``gids`` (this process,
    briefly: the real user stays root, so it can switch back)."""
    groups, egid = os.getgroups(), os.getegid()
    os.setgroups(gids)
    os.setegid(gids[0])
    os.seteuid(uid)
    try:
        return owner_only(path)
    finally:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make files of other users")
def test_kubernetes_secret_mounts_count_as_owner_only() -> None:
    """A Secret volume for a non-root pod: links into ``..data``, the file root:FSGROUP 0440."""
    with tempfile.TemporaryDirectory() as mount:  # under /tmp: other users can reach it
        os.chmod(mount, 0o755)
        _check_secret_mount(Path(mount))


def _check_secret_mount(tmp_path: Path) -> None:
    data = tmp_path / "..2026_12_07_00_00_00.1"
    data.mkdir(mode=0o755)
    key = data / "cluster.key"
    key.write_text("00" * 32 + "\n")
    os.chown(key, 0, 2000)
    key.chmod(0o440)
    (tmp_path / "..data").symlink_to(data.name)
    mounted = tmp_path / "cluster.key"
    mounted.symlink_to("..data/cluster.key")
    assert _owner_only_as(1000, [2000], mounted)  # fsGroup 2000 among the pod's groups
    assert not _owner_only_as(1000, [3000], mounted)  # another group's file
    key.chmod(0o444)
    assert not _owner_only_as(1000, [2000], mounted)  # others may read it
    key.chmod(0o460)
    assert not _owner_only_as(1000, [2000], mounted)  # the group may write it
    key.chmod(0o440)
    os.chown(key, 1001, 2000)
    assert not _owner_only_as(1000, [2000], mounted)  # another (non-root) user's file
    os.chown(key, 1000, 2000)
    assert not _owner_only_as(1000, [2000], mounted)  # our own file must be 0600
    key.chmod(0o600)
    assert _owner_only_as(1000, [2000], mounted)
    key.chmod(0o440)
    os.chown(key, 0, 2000)
    # The group exception holds for the Secret volume's layout only: the same root:2000 0440
    # file reached directly, or through a link that is not the kubelet's, is refused.
    assert not _owner_only_as(1000, [2000], key)
    direct = tmp_path / "direct.key"
    direct.symlink_to(key)
    assert not _owner_only_as(1000, [2000], direct)
    mounted.unlink()
    mounted.symlink_to("..data/missing")
    assert not _owner_only_as(1000, [2000], mounted)  # a dangling link
