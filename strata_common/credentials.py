"""Cluster credentials in secret mode (docs/design/security.md §3.2-§3.3, §4.1, §5.1).

- Secret files: :func:`owner_only` (a file only this user can read; Kubernetes Secret mounts
  included) and :func:`write_secret_file` (atomic, mode 0600). The admin token and the cluster
  key use them.
- The cluster key: 32 random bytes, kept in hex in a 0600 file (:func:`load_or_create_cluster_key`
  for `strata serve`, :func:`read_cluster_key` for a component given ``--cluster-key-file``) and
  the keys derived from it for one purpose each (:func:`derive_key`).
- Identities ``ROLE/NAME`` (:class:`Identity`).
- The proofs: the store protocol's HELLO (:func:`hello_proof`: HMAC-SHA256 over both nonces and
  the identity, one per side) and a gRPC call's ``authorization`` metadata
  (:func:`rpc_authorization`, checked by :func:`check_rpc_authorization` within a time window).

Every comparison of a presented proof is constant time (``hmac.compare_digest``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from strata_common.tls import TlsConfig

__all__ = [
    "CLUSTER_KEY_BYTES",
    "ROLES",
    "RPC_WINDOW_S",
    "ClusterCredentials",
    "CredentialError",
    "Identity",
    "check_rpc_authorization",
    "derive_key",
    "hello_proof",
    "load_or_create_cluster_key",
    "owner_only",
    "read_cluster_key",
    "rpc_authorization",
    "write_secret_file",
]

CLUSTER_KEY_BYTES: Final = 32
ROLES: Final = ("gateway", "worker", "store", "admin")
RPC_WINDOW_S: Final = 120.0
"""How far a call's timestamp may be from the server's clock."""
_NAME = re.compile(r"[A-Za-z0-9\[][A-Za-z0-9._:\[\]-]{0,127}")
_RPC_SCHEME = "Strata-HMAC"
_RPC_VALUE = re.compile(
    r"Strata-HMAC id=(?P<id>[^,\s]{1,160}), ts=(?P<ts>\d{1,12}), mac=(?P<mac>[0-9a-f]{64})"
)


class CredentialError(ValueError):
    """A credential is missing, malformed, unreadable, readable by others, or wrong."""


# -- secret files ------------------------------------------------------------------------------


def owner_only(path: Path) -> bool:
    """True for a secret file only this process's user can read:

    - a regular file of this user that group and others cannot access (``chmod 600``); or
    - a Kubernetes Secret mounted for a non-root pod: ``path`` is a link into the volume's
      ``..data`` directory (itself a link), leading to a root-owned file that others cannot
      access and whose group — one of this process's groups, the pod's ``fsGroup`` — may read
      but not write (mode 0440). Only that layout earns the group exception: elsewhere a
      ``root:users`` 0440 file is readable by every member of the group.

    Links are followed; what is checked is the file they lead to."""
    try:
        st = path.stat()
    except OSError:
        return False
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode) or mode & 0o007:
        return False
    if st.st_uid == os.geteuid():  # the ids file access is checked against
        return mode & 0o070 == 0
    ours = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    return st.st_uid == 0 and ours and mode & 0o020 == 0 and _kubernetes_secret_mount(path)


def _kubernetes_secret_mount(path: Path) -> bool:
    """``path`` is laid out as the kubelet lays out a Secret volume: ``NAME -> ..data/NAME``
    and ``..data -> ..TIMESTAMP`` (the atomic-update directories)."""
    try:
        target = os.readlink(path)
        data = os.readlink(path.parent / "..data")
    except OSError:
        return False
    return target == f"..data/{path.name}" and data.startswith("..") and "/" not in data


def write_secret_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically (a reader sees the old file or the
    whole new one); the directory is created 0700 if missing."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the cluster key ---------------------------------------------------------------------------


def read_cluster_key(path: Path) -> bytes:
    """The cluster key in ``path``: one line of 64 hex digits, in a file only its owner (this
    user) can read; CredentialError otherwise, naming the file and what is wrong."""
    if not owner_only(path):
        if not path.exists():
            raise CredentialError(f"cluster key file {path} does not exist")
        raise CredentialError(
            f"cluster key file {path} must be a regular file of this user that nobody else can "
            f"read (chmod 600 {path})"
        )
    try:
        text = path.read_text(encoding="ascii").strip()
        key = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CredentialError(f"cannot read the cluster key file {path}: {exc}") from None
    if len(key) != CLUSTER_KEY_BYTES:
        raise CredentialError(
            f"cluster key file {path} must hold {CLUSTER_KEY_BYTES} bytes in hex, got {len(key)}"
        )
    return key


def load_or_create_cluster_key(path: Path) -> tuple[bytes, bool]:
    """(key, created): the key in ``path`` if it is a valid owner-only key file, else a new
    random key written there (0600). `strata serve` keeps one per cache directory."""
    try:
        return read_cluster_key(path), False
    except CredentialError:
        key = os.urandom(CLUSTER_KEY_BYTES)
        write_secret_file(path, key.hex() + "\n")
        return key, True


def derive_key(key: bytes, purpose: str) -> bytes:
    """The key for one ``purpose`` (``store-hello``, ``rpc``, ``records``, ...): HMAC-SHA256 of
    ``strata/v1/PURPOSE`` under the cluster key; knowing one derived key reveals no other."""
    return hmac.new(key, f"strata/v1/{purpose}".encode(), hashlib.sha256).digest()


# -- identities --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection or a call is: ``ROLE/NAME``, e.g. ``worker/127.0.0.1:7001``."""

    role: str
    name: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise CredentialError(f"unknown role {self.role!r:.40}; one of {', '.join(ROLES)}")
        if not _NAME.fullmatch(self.name):
            raise CredentialError(f"bad identity name {self.name!r:.80}")

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> Identity:
        role, sep, name = text.partition("/")
        if not sep:
            raise CredentialError(f"identity {text!r:.80} is not ROLE/NAME")
        return cls(role, name)


@dataclass(frozen=True, slots=True)
class ClusterCredentials:
    """What a client proves itself with: the cluster key and the identity it claims (secret
    mode), or its certificate (``tls``, TLS mode: the identity is the certificate's and the key
    is unused; :meth:`strata_common.tls.TlsConfig.credentials`)."""

    key: bytes = dataclasses.field(repr=False)
    identity: Identity
    tls: TlsConfig | None = None

    def __post_init__(self) -> None:
        if self.tls is None and len(self.key) != CLUSTER_KEY_BYTES:
            raise CredentialError(f"a cluster key is {CLUSTER_KEY_BYTES} bytes")


# -- proofs ------------------------------------------------------------------------------------


def hello_proof(
    key: bytes,
    side: Literal["node", "client"],
    identity: Identity,
    client_nonce: bytes,
    node_nonce: bytes,
) -> bytes:
    """The HELLO proof of ``side`` under the ``store-hello`` key (32 bytes): each side proves it
    holds the key over both fresh nonces, so neither proof can be replayed or reflected."""
    message = b"|".join(
        [b"strata-store-hello/1", side.encode(), str(identity).encode(), client_nonce, node_nonce]
    )
    return hmac.new(derive_key(key, "store-hello"), message, hashlib.sha256).digest()


def _rpc_mac(key: bytes, identity: str, method: str, ts: int) -> str:
    message = f"{identity}|{method}|{ts}".encode()
    return hmac.new(derive_key(key, "rpc"), message, hashlib.sha256).hexdigest()


def rpc_authorization(key: bytes, identity: Identity, method: str, now: float) -> str:
    """The ``authorization`` metadata of one gRPC call to ``method`` (the full method name,
    ``/package.Service/Method``) by ``identity`` at ``now`` (Unix seconds)."""
    ts = int(now)
    return f"{_RPC_SCHEME} id={identity}, ts={ts}, mac={_rpc_mac(key, str(identity), method, ts)}"


def check_rpc_authorization(
    key: bytes, value: str | None, method: str, now: float, window_s: float = RPC_WINDOW_S
) -> Identity:
    """The caller's identity if ``value`` is a valid proof for ``method`` made within
    ``window_s`` of ``now``; CredentialError (a reason safe to tell the caller) otherwise."""
    if not value:
        raise CredentialError("no credentials (metadata `authorization: Strata-HMAC ...`)")
    match = _RPC_VALUE.fullmatch(value.strip())
    if match is None:
        raise CredentialError("malformed credentials")
    ts = int(match["ts"])
    if abs(now - ts) > window_s:
        raise CredentialError("credentials expired or from the future (check the clocks)")
    expected = _rpc_mac(key, match["id"], method, ts)
    if not hmac.compare_digest(expected, match["mac"]):
        raise CredentialError("wrong credentials")
    return Identity.parse(match["id"])
