"""TLS mode: mutual TLS under the cluster CA (docs/design/security.md §3.1).

One owner for the TLS plumbing of every component:

- :class:`TlsConfig`: the three files ``--tls-cert``, ``--tls-key``, ``--tls-ca`` (a config group
  of the store node, the worker and the gateway), validated on construction: all three or none,
  the key a 0600 file of this user, the certificate signed by the CA, matching the key, and
  naming one identity (its URI SAN ``strata://ROLE/NAME``, :func:`identity_of`).
- Contexts and credentials made from it: :meth:`TlsConfig.server_context` (an
  :class:`ssl.SSLContext` that requires a client certificate signed by the CA),
  :meth:`TlsConfig.client_context` (checks the server's certificate against the CA and the host
  name), :meth:`TlsConfig.grpc_server_credentials` (``require_client_auth=True``) and
  :meth:`TlsConfig.grpc_channel_credentials`.
- The peer's identity: :func:`ssl_peer_identity` (an ``ssl`` socket or object, either side) and
  :func:`grpc_peer_identity` (a gRPC servicer context's ``auth_context()``).
- The listening rule (§7): :func:`check_listen` refuses a non-loopback address without
  credentials unless ``--insecure``, and :func:`insecure_warning` is what a component told
  ``--insecure`` logs at every start.

A client also checks the role of the server it reaches (:func:`check_peer_role`) where it can see
its certificate: on ``ssl`` sockets. A gRPC client in Python cannot see the server's certificate;
it checks the chain and the host name only (§3.1 says so).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from strata_common.credentials import ClusterCredentials, CredentialError, Identity, owner_only
from strata_common.options import option

if TYPE_CHECKING:  # gRPC is imported where its credentials are made: the store's data path
    import grpc  # (kvstore/server/auth.py) uses this module and never loads it

__all__ = [
    "INSECURE_HELP",
    "TLS_FLAGS",
    "URI_PREFIX",
    "TlsConfig",
    "check_listen",
    "check_peer_role",
    "grpc_peer_identity",
    "identity_of",
    "insecure_warning",
    "is_loopback",
    "ssl_peer_identity",
]

URI_PREFIX: Final = "strata://"
_MIN_VERSION: Final = ssl.TLSVersion.TLSv1_3
"""Both ends are Strata's: TLS 1.3 only (no renegotiation, forward secrecy, one round trip)."""


def identity_of(cert: x509.Certificate) -> Identity:
    """The identity a certificate names (its one ``strata://ROLE/NAME`` URI SAN)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CredentialError("the certificate has no subject alternative name") from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    ours = [u for u in uris if u.startswith(URI_PREFIX)]
    if len(ours) != 1:
        raise CredentialError(f"the certificate names {len(ours)} strata:// identities, not 1")
    return Identity.parse(ours[0].removeprefix(URI_PREFIX))


def _identity_of_pem(pem: bytes) -> Identity:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CredentialError(f"unreadable certificate: {exc}") from None
    return identity_of(cert)


def ssl_peer_identity(sock: ssl.SSLSocket | ssl.SSLObject) -> Identity:
    """The identity in the peer's certificate (verified by the handshake); CredentialError if
    the peer sent none or it names no single identity."""
    der = sock.getpeercert(binary_form=True)
    if not der:
        raise CredentialError("the peer sent no certificate")
    return identity_of(x509.load_der_x509_certificate(der))


def grpc_peer_identity(context: Any) -> Identity:
    """The identity in the certificate of a gRPC call's peer (``context``: a servicer
    context of a server bound with :meth:`TlsConfig.grpc_server_credentials`)."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if len(pems) != 1:
        raise CredentialError("no client certificate (TLS mode: mutual TLS under the cluster CA)")
    return _identity_of_pem(pems[0])


def check_peer_role(identity: Identity, role: str) -> None:
    """CredentialError unless the peer (a server this client reached) has ``role``."""
    if identity.role != role:
        raise CredentialError(f"the peer is {identity}, not a {role}/* component")


TLS_FLAGS: Final = "--tls-cert, --tls-key and --tls-ca"
INSECURE_HELP: Final = (
    "serve a non-loopback address without credentials (anyone who can reach it is trusted; "
    "logged at every start)"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost``, 127.0.0.0/8, ``::1``); a host
    name other than ``localhost`` and the wildcard addresses are not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, flag: str, *, secured: bool, insecure: bool, needs: str) -> None:
    """The non-loopback rule (docs/design/security.md §7): CredentialError (a ValueError, so a
    usage error naming the missing flags) for a non-loopback ``host`` (given by ``flag``)
    unless the listener is ``secured`` (``needs`` names how) or ``insecure`` is set. The
    cluster key alone does not secure a listener: secret mode is for loopback only."""
    if secured or insecure or is_loopback(host):
        return
    raise CredentialError(
        f"refusing to listen on {host} ({flag}) without credentials: give {needs}, or "
        "--insecure true to serve it to anyone who can reach it (--cluster-key-file alone is "
        "for loopback only)"
    )


def insecure_warning(
    host: str, what: str, *, secured: bool, insecure: bool, keyed: bool = False
) -> str | None:
    """What a component logs at every start when ``--insecure`` lets it serve ``what`` on a
    non-loopback ``host`` without TLS (None otherwise). ``keyed``: it checks the cluster key's
    proofs (secret mode), which say who connects but protect nothing on the wire."""
    if not insecure or secured or is_loopback(host):
        return None
    if keyed:
        return (
            f"--insecure: {what} on {host} WITHOUT TLS: the cluster key proves who connects, "
            "but anyone on the network path can read and alter the traffic"
        )
    return f"--insecure: {what} on {host} WITHOUT credentials: anyone who can reach it is trusted"


def _path(value: Path | str | None) -> Path | None:
    return None if value is None else Path(value)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """A component's TLS credentials (a config group, flags ``--tls-cert``, ``--tls-key``,
    ``--tls-ca``): none, or all three. Validated on construction (``ValueError``, naming the
    file and what is wrong); the private key is read only when a context is made."""

    cert: Path | None = option(
        None, help="this component's certificate (PEM, `strata certs issue`): TLS mode"
    )
    key: Path | None = option(None, help="its private key (PEM, a 0600 file)")
    ca: Path | None = option(
        None, help="the cluster CA's certificate (PEM): peers must present one it signed"
    )

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            object.__setattr__(self, name, _path(getattr(self, name)))
        given = [n for n in ("cert", "key", "ca") if getattr(self, n) is not None]
        if given and len(given) != 3:
            missing = [f"--tls-{n}" for n in ("cert", "key", "ca") if n not in given]
            raise CredentialError(
                f"TLS needs --tls-cert, --tls-key and --tls-ca; missing {missing}"
            )
        if not given:
            return
        assert self.key is not None and self.cert is not None and self.ca is not None
        if not owner_only(self.key):
            raise CredentialError(
                f"TLS key {self.key} must be a regular file of this user that nobody else can "
                f"read (chmod 600 {self.key})"
            )
        for path in (self.cert, self.ca):
            if not path.is_file():
                raise CredentialError(f"TLS file {path} does not exist")
        try:
            cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
            ca = x509.load_pem_x509_certificate(self.ca.read_bytes())
        except ValueError as exc:
            raise CredentialError(f"unreadable certificate: {exc}") from None
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CredentialError(
                f"{self.cert} is not signed by the CA in {self.ca} ({type(exc).__name__})"
            ) from None
        identity_of(cert)  # names one identity
        self.server_context()  # the key matches the certificate (ssl.SSLError otherwise)

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    def identity(self) -> Identity:
        """This component's identity: its certificate's."""
        assert self.cert is not None, "TLS is not configured"
        return _identity_of_pem(self.cert.read_bytes())

    def check_role(self, role: str) -> Identity:
        """This component's identity; CredentialError unless it has ``role``."""
        identity = self.identity()
        if identity.role != role:
            raise CredentialError(
                f"{self.cert} names {identity}; this component needs a {role}/* certificate"
            )
        return identity

    def credentials(self, role: str) -> ClusterCredentials:
        """A store client's credentials in TLS mode (this certificate, which must name
        ``role``)."""
        return ClusterCredentials(b"", self.check_role(role), tls=self)

    def connect_ssl(self, sock: socket.socket, host: str, role: str) -> ssl.SSLSocket:
        """``sock`` (connected to a server at ``host``) wrapped in TLS as this certificate's
        client; CredentialError unless the server's certificate names ``role``."""
        wrapped = self.client_context().wrap_socket(sock, server_hostname=host)
        try:
            check_peer_role(ssl_peer_identity(wrapped), role)
        except CredentialError:
            wrapped.close()
            raise
        return wrapped

    def name_for(self, role: str, configured: str | None, flag: str) -> str:
        """This component's NAME: its certificate's, which must be of ``role``; ValueError if
        the id configured with ``flag`` names another (a certificate names its component)."""
        name = self.check_role(role).name
        if configured is not None and configured != name:
            raise ValueError(f"{flag} {configured!r} differs from its certificate's {role}/{name}")
        return name

    def _files(self) -> tuple[str, str, str]:
        if self.cert is None or self.key is None or self.ca is None:
            raise CredentialError("TLS is not configured (--tls-cert, --tls-key, --tls-ca)")
        return str(self.cert), str(self.key), str(self.ca)

    def server_context(self) -> ssl.SSLContext:
        """A server context that requires a client certificate signed by the CA."""
        cert, key, ca = self._files()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _MIN_VERSION
        try:
            context.load_cert_chain(cert, key)
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise CredentialError(f"TLS files {cert}, {key}, {ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context: presents this certificate, checks the server's against the CA and
        the host name it is given (``server_hostname``)."""
        cert, key, ca = self._files()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        context.minimum_version = _MIN_VERSION
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=ca)
        return context

    def grpc_server_credentials(self) -> grpc.ServerCredentials:
        import grpc

        cert, key, ca = self._files()
        pair = (Path(key).read_bytes(), Path(cert).read_bytes())
        return grpc.ssl_server_credentials(
            [pair], root_certificates=Path(ca).read_bytes(), require_client_auth=True
        )

    def grpc_channel_credentials(self) -> grpc.ChannelCredentials:
        import grpc

        cert, key, ca = self._files()
        return grpc.ssl_channel_credentials(
            root_certificates=Path(ca).read_bytes(),
            private_key=Path(key).read_bytes(),
            certificate_chain=Path(cert).read_bytes(),
        )
