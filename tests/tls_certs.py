"""Certificates for TLS-mode tests (docs/design/security.md §3.1): a cluster CA made by
`strata certs` in a temporary directory, one :class:`TlsConfig` per identity (valid for
127.0.0.1 and localhost), and the credentials of outsiders: a client without a certificate and
one whose certificate another CA signed (both trust the cluster's CA, so only the server's
check of the client can refuse them)."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from strata.certs import IssuedFiles, init_ca, issue
from strata_common.credentials import Identity
from strata_common.tls import TlsConfig

HOSTS = ["127.0.0.1", "localhost"]


class Cluster:
    """A CA in ``directory`` and the certificates it issues."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        init_ca(directory)
        self.ca = directory / "ca.pem"

    def files(self, identity: str, hosts: list[str] = HOSTS) -> IssuedFiles:
        return issue(self.directory, Identity.parse(identity), hosts, self.directory / "issued")

    def tls(self, identity: str, hosts: list[str] = HOSTS) -> TlsConfig:
        """A TlsConfig of ``identity`` (``ROLE/NAME``) signed by this CA."""
        files = self.files(identity, hosts)
        return TlsConfig(cert=files.cert, key=files.key, ca=self.ca)

    # -- outsiders ------------------------------------------------------------------------

    def grpc_outsider(self, files: IssuedFiles | None) -> grpc.ChannelCredentials:
        """gRPC channel credentials that trust this CA and present ``files`` (None: nothing)."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=None if files is None else files.key.read_bytes(),
            certificate_chain=None if files is None else files.cert.read_bytes(),
        )

    def ssl_outsider(self, files: IssuedFiles | None) -> ssl.SSLContext:
        """An ssl client context that trusts this CA and presents ``files`` (None: nothing)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(self.ca))
        if files is not None:
            context.load_cert_chain(str(files.cert), str(files.key))
        return context


def outsiders(cluster: Cluster, tmp_path: Path, identity: str) -> dict[str, IssuedFiles | None]:
    """The outsiders every TLS test refuses: no certificate, and ``identity``'s certificate
    signed by another CA."""
    other = Cluster(tmp_path / "other-ca")
    return {"no certificate": None, "another CA": other.files(identity)}
