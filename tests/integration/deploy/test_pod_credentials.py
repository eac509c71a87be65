"""The init container of every Strata pod (deploy/k8s/base/pod-credentials.sh), run for real: it
leaves the component a certificate naming ROLE/NAME for the hosts it is dialled at, its key as a
0600 file of the component's user, the CA's certificate, and nothing of the CA's key."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

from cryptography import x509

from strata_common.tls import TlsConfig, identity_of
from tests.integration.deploy.cluster_files import FakeRoot, make_ca, run_pod_credentials

MOUNTS = ["/run/strata/credentials", "/run/strata-ca"]


def test_a_worker_pod_gets_its_own_certificate_and_private_copies(tmp_path: Path) -> None:
    root = FakeRoot(tmp_path / "pod", MOUNTS)
    ca = make_ca(tmp_path / "ca")
    done = run_pod_credentials(
        root,
        ["worker", "strata-prefill-5d8f9c7b6-x2x4q", "10.244.1.7"],
        ca,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = root.path("/run/strata/credentials")
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "tls.crt", "tls.key"]
    for path in out.iterdir():
        st = path.lstat()
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, path
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    assert str(identity_of(cert)) == "worker/strata-prefill-5d8f9c7b6-x2x4q"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.244.1.7")]
    assert (out / "ca.pem").read_bytes() == (ca / "ca.pem").read_bytes()
    # The CA's key was only in the init container's own scratch volume, and is gone.
    assert not root.path("/run/strata-ca").exists() or not any(
        root.path("/run/strata-ca").iterdir()
    )
    key = (ca / "ca-key.pem").read_bytes()
    assert all(path.read_bytes() != key for path in out.iterdir())
    tls = TlsConfig(cert=out / "tls.crt", key=out / "tls.key", ca=out / "ca.pem")
    assert tls.check_role("worker").name == "strata-prefill-5d8f9c7b6-x2x4q"


def test_a_gateway_pod_is_named_for_every_host_it_is_dialled_at(tmp_path: Path) -> None:
    root = FakeRoot(tmp_path / "pod", MOUNTS)
    ca = make_ca(tmp_path / "ca")
    args = ["gateway", "strata-gateway-7c9d-abcde", "10.244.2.9", "127.0.0.1", "localhost"]
    done = run_pod_credentials(root, args, ca, tmp_path)
    assert done.returncode == 0, done.stderr
    out = root.path("/run/strata/credentials")
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(map(str, sans.get_values_for_type(x509.IPAddress))) == [
        "10.244.2.9",
        "127.0.0.1",
    ]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert str(identity_of(cert)) == "gateway/strata-gateway-7c9d-abcde"


def test_without_the_ca_the_pod_does_not_start(tmp_path: Path) -> None:
    root = FakeRoot(tmp_path / "pod", MOUNTS)
    args = ["store", "node-a", "192.0.2.10"]
    done = run_pod_credentials(root, args, tmp_path / "no-ca", tmp_path)
    assert done.returncode != 0
    assert not root.path("/run/strata/credentials/tls.key").exists()
