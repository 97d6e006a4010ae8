"""Server TLS and mutual TLS from the settings `tls_cert`, `tls_key` and `tls_client_ca`.

Every file is read and checked when the server is built, so that a missing file, a key that does not match its
certificate or an encrypted key is a `ValueError` naming the setting and the path at startup. Left to gRPC, each
of those is a bare "Failed to bind to address" at `add_secure_port`.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["TlsFiles", "is_loopback", "load_tls"]

_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"  # PKCS#8 "PRIVATE KEY", and the older "EC PRIVATE KEY" / "RSA PRIVATE KEY"


@dataclass(frozen=True)
class TlsFiles:
    """The server's TLS material, read and checked.

    Attributes:
        certificate_chain: the server's certificate chain (PEM).
        private_key: the server's private key (PEM, unencrypted).
        client_ca: the CAs client certificates must be signed by (PEM); None: no client certificates (plain
            TLS); set: every client must present one they signed (mutual TLS).
    """

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate."""
        return self.client_ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials; with a client CA, client certificates are required and verified."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def _read(setting: str, path: str, marker: bytes, kind: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
    if marker not in data:
        raise ValueError(f"{setting}: {path} holds no PEM {kind} (no line with {marker.decode()!r})")
    return data


def _encrypted_key(path: str) -> bytes:
    raise ValueError(f"tls_key: {path} is encrypted; give the server an unencrypted key (protect the file instead)")


def load_tls(tls_cert: str, tls_key: str, tls_client_ca: str) -> TlsFiles | None:
    """Read and check the TLS settings' files; None when TLS is off (neither `tls_cert` nor `tls_key` set).

    Raises ValueError naming the setting and the path: a file that cannot be read or holds no PEM of its kind,
    one of `tls_cert`/`tls_key` without the other, a key that does not match the certificate, an encrypted key,
    or `tls_client_ca` without TLS.
    """
    if not tls_cert and not tls_key:
        if tls_client_ca:
            raise ValueError(
                f"tls_client_ca ({tls_client_ca}) needs tls_cert and tls_key: mutual TLS runs over the server's TLS"
            )
        return None
    if not tls_cert or not tls_key:
        given, missing = ("tls_cert", "tls_key") if tls_cert else ("tls_key", "tls_cert")
        raise ValueError(f"{given} is set ({tls_cert or tls_key}) but {missing} is not: TLS needs both")
    chain = _read("tls_cert", tls_cert, _CERTIFICATE, "certificate")
    key = _read("tls_key", tls_key, _PRIVATE_KEY, "private key")
    client_ca = _read("tls_client_ca", tls_client_ca, _CERTIFICATE, "certificate") if tls_client_ca else None
    # The standard library's OpenSSL parses the pair the way gRPC's BoringSSL will, and says what is wrong.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls_cert, tls_key, password=lambda: _encrypted_key(tls_key))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"tls_key: {tls_key} is not the private key of the certificate in {tls_cert}") from None
        raise ValueError(f"tls_cert/tls_key: {tls_cert} and {tls_key} cannot be loaded as PEM: {exc}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", errors="replace"))
        except ssl.SSLError as exc:
            raise ValueError(f"tls_client_ca: {tls_client_ca} cannot be loaded as PEM certificates: {exc}") from None
    return TlsFiles(chain, key, client_ca)


def is_loopback(host: str) -> bool:
    """Whether a listening host (from HOST:PORT) is reachable only from this machine.

    "localhost", 127.0.0.0/8 and ::1 are; a wildcard (0.0.0.0, ::), any other address and any other name are not.
    """
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
