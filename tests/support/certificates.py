"""Certificates made on the fly for TLS and mutual-TLS tests: CAs, server and client certificates, as PEM files.

Everything is generated with `cryptography` (EC P-256 keys: fast to make), so no test depends on a committed key
or on a certificate that expires some day.

    pki = Pki.create(tmp_path)
    pki.ca.cert_path                     # the CA a client trusts
    pki.server.cert_path, .key_path      # SAN 127.0.0.1, ::1 and localhost
    pki.client("admin").cert_path        # a client certificate with CN=admin
    pki.other_ca                         # an unrelated CA, and pki.foreign_client: a client certificate it issued
    pki.expired_server                   # valid for 127.0.0.1 but expired yesterday
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Issued", "Pki", "issue", "make_ca"]

_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, in memory and written to `cert_path` / `key_path`."""

    name: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    @property
    def cert_pem(self) -> bytes:
        """The certificate as PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _write(directory: Path, name: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    issued = Issued(name, certificate, key, directory / f"{name}.crt", directory / f"{name}.key")
    issued.cert_path.write_bytes(issued.cert_pem)
    issued.key_path.write_bytes(issued.key_pem)
    return issued


def make_ca(directory: Path, name: str) -> Issued:
    """A self-signed CA certificate (CN=`name`), valid from yesterday for a year."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 365 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, name, certificate, key)


def issue(
    ca: Issued,
    directory: Path,
    name: str,
    *,
    common_name: str,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    server: bool = False,
    expired: bool = False,
) -> Issued:
    """A leaf certificate signed by `ca`, for a server (serverAuth) or a client (clientAuth).

    `expired` makes it valid from ten days ago until yesterday.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = (now - 10 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
    names: list[x509.GeneralName] = [x509.DNSName(dns) for dns in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(directory, name, builder.sign(ca.key, hashes.SHA256()), key)


def _local_server(ca: Issued, directory: Path, name: str, *, expired: bool = False) -> Issued:
    """A server certificate for this machine: SAN localhost, 127.0.0.1 and ::1."""
    return issue(
        ca,
        directory,
        name,
        common_name="tensorgate",
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1", "::1"),
        server=True,
        expired=expired,
    )


@dataclass(frozen=True)
class Pki:
    """A test PKI: a CA with a server certificate, client certificates on demand, and what must be refused."""

    directory: Path
    ca: Issued
    server: Issued
    other_ca: Issued
    foreign_client: Issued
    expired_server: Issued

    @classmethod
    def create(cls, directory: Path) -> Pki:
        """Make the CAs and certificates under `directory`."""
        ca = make_ca(directory, "test-ca")
        other_ca = make_ca(directory, "other-ca")
        return cls(
            directory=directory,
            ca=ca,
            server=_local_server(ca, directory, "server"),
            other_ca=other_ca,
            foreign_client=issue(other_ca, directory, "foreign-client", common_name="admin"),
            expired_server=_local_server(ca, directory, "expired-server", expired=True),
        )

    def client(self, common_name: str, *, dns_names: tuple[str, ...] = ()) -> Issued:
        """A client certificate from the CA, with CN=`common_name` and optional DNS SANs."""
        return issue(self.ca, self.directory, f"client-{common_name}", common_name=common_name, dns_names=dns_names)
