"""``rtseg federation certs``: a private CA, the coordinator's TLS certificate, ECDSA site keys.

The server certificate carries SAN ``IP:127.0.0.1`` and ``DNS:localhost`` (the
SuperLink's own executor connects back over TLS) plus any further names given.
Site keys are ECDSA P-384 in OpenSSH format, as Flower's SuperNode
authentication expects; their public halves are registered at the SuperLink.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rtseg.errors import FederationError
from rtseg.paths import safe_child, safe_name


@dataclass(frozen=True)
class FederationCerts:
    ca: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[str, tuple[Path, Path]]  # site → (private key, public key)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def make_certs(
    out: Path, sites: list[str], federation: str = "rtseg", hosts: tuple[str, ...] = (), days: int = 825
) -> FederationCerts:
    """Write ``ca.crt``, ``server.crt``/``server.key`` and ``sites/<site>[.pub]`` into ``out``.

    Site names become file names: each must be a plain name (:func:`rtseg.paths.safe_name`),
    checked before anything is written; else :class:`FederationError`.
    """
    for site in sites:
        safe_name(site, "site name", FederationError)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{federation} federation CA"))
        .issuer_name(_name(f"{federation} federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{federation} coordinator"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(ca_key, out / "ca.key")
    (out / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, out / "server.key")
    return FederationCerts(
        out / "ca.crt", out / "server.crt", out / "server.key", {s: site_key(out / "sites", s) for s in sites}
    )


def site_key(folder: Path, site: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: ``<site>`` (private) and ``<site>.pub``."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = safe_child(folder, site, "site name", FederationError)
    public = folder / f"{private.name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" {site}\n".encode()
    )
    return private, public
