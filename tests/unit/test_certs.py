"""`strata certs`: a CA, certificates naming identities, and mutual TLS with them (real TLS
handshakes over a socket pair, with Python's ssl module)."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509

from strata.certs import IssuedFiles, identity_of, init_ca, issue, main
from strata_common.credentials import CredentialError, Identity


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    init_ca(directory)
    return directory


def test_the_ca_and_a_certificate(ca: Path, tmp_path: Path) -> None:
    assert os.stat(ca / "ca-key.pem").st_mode & 0o777 == 0o600
    files = issue(ca, Identity("worker", "w3"), ["h3.example", "10.0.0.3"], tmp_path / "out")
    assert files == IssuedFiles(tmp_path / "out/worker-w3.pem", tmp_path / "out/worker-w3-key.pem")
    assert os.stat(files.key).st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert identity_of(cert) == Identity("worker", "w3")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["h3.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.3"]
    with pytest.raises(CredentialError, match="no subject alternative name"):
        identity_of(ca_cert)


def test_refusals(ca: Path, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        init_ca(ca)
    with pytest.raises(ValueError, match="--host"):
        issue(ca, Identity("store", "n1"), [], tmp_path)
    with pytest.raises(ValueError, match="--days"):
        issue(ca, Identity("store", "n1"), ["h"], tmp_path, days=0)
    with pytest.raises(CredentialError, match="unknown role"):
        Identity("root", "x")
    (ca / "ca-key.pem").chmod(0o644)
    with pytest.raises(CredentialError, match="0600"):
        issue(ca, Identity("store", "n1"), ["h"], tmp_path)


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "cli"
    assert main(["init", "--dir", str(directory)]) == 0
    argv = ["issue", "--dir", str(directory), "--role", "gateway", "--name", "g1"]
    assert main([*argv, "--host", "127.0.0.1"]) == 0
    assert "gateway-g1.pem" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["issue", "--dir", str(directory), "--role", "king", "--name", "x", "--host", "h"])
    assert info.value.code == 2
    assert "unknown role" in capsys.readouterr().err


def _context(ca: Path, files: IssuedFiles, server: bool) -> ssl.SSLContext:
    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    context = ssl.create_default_context(purpose, cafile=str(ca / "ca.pem"))
    context.load_cert_chain(str(files.cert), str(files.key))
    if server:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Identity | str:
    """Mutual TLS over a socket pair: the client's identity as the server saw it, or the
    server's error (the client's error is not the server's decision: TLS 1.3 lets a client
    finish before the server has checked its certificate)."""
    left, right = socket.socketpair()
    seen: list[Identity | str] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(left, server_side=True) as conn:
                der = conn.getpeercert(binary_form=True)
                assert der is not None
                seen.append(identity_of(x509.load_der_x509_certificate(der)))
                conn.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen.append(f"server: {exc}")

    thread = threading.Thread(target=serve)
    thread.start()
    with (
        contextlib.suppress(ssl.SSLError, OSError),
        client_ctx.wrap_socket(right, server_hostname="localhost") as conn,
    ):
        conn.recv(2)
    right.close()
    thread.join(10)
    (outcome,) = seen
    return outcome


def test_mutual_tls_with_the_issued_certificates(ca: Path, tmp_path: Path) -> None:
    node = issue(ca, Identity("store", "n1"), ["localhost"], tmp_path / "n")
    client = issue(ca, Identity("worker", "w1"), ["localhost"], tmp_path / "w")
    assert _handshake(_context(ca, node, True), _context(ca, client, False)) == Identity(
        "worker", "w1"
    )
    # A certificate of another CA is refused.
    other = tmp_path / "other-ca"
    init_ca(other)
    stranger = issue(other, Identity("worker", "w1"), ["localhost"], tmp_path / "s")
    # The stranger trusts our CA (it can check the node) but presents its own CA's certificate:
    # the node refuses it; no identity is ever taken from it.
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca / "ca.pem"))
    client_ctx.load_cert_chain(str(stranger.cert), str(stranger.key))
    outcome = _handshake(_context(ca, node, True), client_ctx)
    assert isinstance(outcome, str) and outcome.startswith("server:"), outcome
