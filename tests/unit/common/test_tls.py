"""strata_common.tls: the TLS files as a validated config piece, the contexts made from them, and
the peer identities they yield, in real TLS handshakes over socket pairs."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

import pytest

from strata_common.credentials import CredentialError, Identity
from strata_common.options import from_cli, group
from strata_common.tls import TlsConfig, check_peer_role, ssl_peer_identity
from tests.tls_certs import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Cluster:
    return Cluster(tmp_path / "ca")


def _handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "127.0.0.1"
) -> tuple[Identity | str, Identity | str]:
    """(the client's identity as the server saw it or the server's error, the server's
    identity as the client saw it or the client's error)."""
    a, b = socket.socketpair()
    seen: dict[str, Identity | str] = {}

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as s:
                seen["server"] = ssl_peer_identity(s)
                s.sendall(b"x")
        except (ssl.SSLError, OSError, CredentialError) as exc:
            seen["server"] = type(exc).__name__

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(b, server_hostname=hostname) as c:
            seen["client"] = ssl_peer_identity(c)
            c.recv(1)
    except (ssl.SSLError, OSError) as exc:
        seen["client"] = type(exc).__name__
    finally:
        with contextlib.suppress(OSError):
            b.close()
        thread.join(10)
        a.close()
    return seen["server"], seen["client"]


def test_mutual_tls_names_both_sides(cluster: Cluster) -> None:
    node, worker = cluster.tls("store/n1"), cluster.tls("worker/w1")
    assert node.identity() == Identity("store", "n1")
    server_saw, client_saw = _handshake(node.server_context(), worker.client_context())
    assert (server_saw, client_saw) == (Identity("worker", "w1"), Identity("store", "n1"))
    check_peer_role(Identity("store", "n1"), "store")
    with pytest.raises(CredentialError, match="store/n1, not a worker"):
        check_peer_role(Identity("store", "n1"), "worker")


def test_outsiders_are_refused_by_the_server(cluster: Cluster, tmp_path: Path) -> None:
    node = cluster.tls("store/n1")
    other = Cluster(tmp_path / "other")
    no_cert = cluster.ssl_outsider(None)
    assert _handshake(node.server_context(), no_cert)[0] == "SSLError"
    stranger = cluster.ssl_outsider(other.files("worker/w1"))
    assert _handshake(node.server_context(), stranger)[0] == "SSLCertVerificationError"
    # A client of the cluster refuses a server with another CA's certificate, or the wrong host.
    fake = other.tls("store/n1")
    assert _handshake(fake.server_context(), cluster.tls("worker/w1").client_context())[1] == (
        "SSLCertVerificationError"
    )
    worker = cluster.tls("worker/w2")
    assert _handshake(node.server_context(), worker.client_context(), "h9.example")[1] == (
        "SSLCertVerificationError"
    )


def test_the_config_refuses_what_cannot_work(cluster: Cluster, tmp_path: Path) -> None:
    good = cluster.tls("worker/w1")
    assert TlsConfig().enabled is False
    with pytest.raises(CredentialError, match=r"missing \['--tls-key', '--tls-ca'\]"):
        TlsConfig(cert=good.cert)
    assert good.key is not None and good.cert is not None
    good.key.chmod(0o640)
    with pytest.raises(CredentialError, match="chmod 600"):
        TlsConfig(cert=good.cert, key=good.key, ca=cluster.ca)
    good.key.chmod(0o600)
    other = Cluster(tmp_path / "other")
    with pytest.raises(CredentialError, match="is not signed by the CA"):
        TlsConfig(cert=good.cert, key=good.key, ca=other.ca)
    mismatched = cluster.tls("worker/w2")
    with pytest.raises(CredentialError, match="TLS files"):
        TlsConfig(cert=good.cert, key=mismatched.key, ca=cluster.ca)
    with pytest.raises(CredentialError, match="does not exist"):
        TlsConfig(cert=tmp_path / "nope.pem", key=good.key, ca=cluster.ca)
    with pytest.raises(CredentialError, match="needs a store/\\* certificate"):
        good.check_role("store")
    assert good.check_role("worker") == Identity("worker", "w1")


def test_the_flags(cluster: Cluster) -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Component:
        tls: TlsConfig = group(TlsConfig, title="TLS", prefix="tls-")

    good = cluster.tls("gateway/g1")
    argv = ["--tls-cert", str(good.cert), "--tls-key", str(good.key)]
    config = from_cli(Component, [*argv, "--tls-ca", str(cluster.ca)])
    assert config.tls == good
    with pytest.raises(SystemExit):
        from_cli(Component, argv)
