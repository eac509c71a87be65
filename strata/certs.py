"""`strata certs`: the cluster CA and one certificate per component, for TLS mode
(docs/design/security.md §3.1).

    strata certs init  --dir DIR                      # DIR/ca.pem, DIR/ca-key.pem (0600)
    strata certs issue --dir DIR --role worker --name w3 --host h3.example [--host 10.0.0.3]
                       [--out OUT] [--days 365]       # OUT/worker-w3.pem, OUT/worker-w3-key.pem

A component's identity is its certificate's URI SAN ``strata://ROLE/NAME``; the ``--host`` names
(DNS names or IP addresses) are its DNS/IP SANs, what clients check when they connect to it. Keys
are EC P-256; private keys are written 0600 and never printed. The CA signs only certificates
for the four roles (`strata_common.credentials.ROLES`); a certificate is valid for ``--days``
(365 by default), the CA for ten years.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from strata_common.credentials import CredentialError, Identity, owner_only, write_secret_file
from strata_common.tls import URI_PREFIX, identity_of

__all__ = ["IssuedFiles", "identity_of", "init_ca", "issue", "main"]

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
CA_DAYS = 3650


@dataclass(frozen=True)
class IssuedFiles:
    cert: Path
    key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret_file(path, pem.decode("ascii"))


def init_ca(directory: Path, *, now: datetime.datetime | None = None) -> Path:
    """Create the cluster CA in ``directory`` (refusing to overwrite one); its certificate."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() or key_path.exists():
        raise FileExistsError(f"{directory} already holds a CA ({CA_CERT}, {CA_KEY})")
    start = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Strata cluster CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(start + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key_path = directory / CA_KEY
    if not owner_only(key_path):
        raise CredentialError(f"{key_path} must exist, be this user's and nobody else's (0600)")
    cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialError(f"{key_path} is not an EC private key")
    return cert, key


def issue(
    directory: Path,
    identity: Identity,
    hosts: list[str],
    out: Path,
    *,
    days: int = 365,
    now: datetime.datetime | None = None,
) -> IssuedFiles:
    """A key and a certificate for ``identity``, signed by the CA in ``directory``, valid for
    ``hosts`` (DNS names or IP addresses) for ``days``; written to ``out``."""
    if not hosts:
        raise ValueError("a certificate needs at least one --host")
    if not 1 <= days <= 3650:
        raise ValueError(f"--days must be in 1..3650, got {days}")
    ca_cert, ca_key = _load_ca(directory)
    start = now or _now()
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"{URI_PREFIX}{identity}")]
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    base = f"{identity.role}-{identity.name.replace(':', '_').replace('/', '_')}"
    files = IssuedFiles(out / f"{base}.pem", out / f"{base}-key.pem")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_key(files.key, key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="strata certs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create the cluster CA")
    init.add_argument("--dir", type=Path, required=True, help="where the CA is kept (0700)")
    iss = sub.add_parser("issue", help="a key and certificate for one component")
    iss.add_argument("--dir", type=Path, required=True, help="the CA's directory")
    iss.add_argument("--role", required=True, help="gateway, worker, store or admin")
    iss.add_argument("--name", required=True, help="the component's name (its identity)")
    iss.add_argument("--host", action="append", default=[], help="DNS name or IP it serves on")
    iss.add_argument("--out", type=Path, help="output directory (default: --dir)")
    iss.add_argument("--days", type=int, default=365, help="validity (default 365)")
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            print(f"strata certs: CA certificate {init_ca(args.dir)}")
            return 0
        files = issue(
            args.dir,
            Identity(args.role, args.name),
            args.host,
            args.out or args.dir,
            days=args.days,
        )
    except (CredentialError, ValueError, FileExistsError, OSError) as exc:
        parser.error(str(exc))
    print(f"strata certs: {files.cert} (key {files.key})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
