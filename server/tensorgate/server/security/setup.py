"""The server's security from its settings: TLS credentials for the port, and the access policy's interceptor."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from tensorgate.server.security.auth import AccessPolicy, AuthInterceptor
from tensorgate.server.security.tls import TlsFiles, is_loopback, load_tls
from tensorgate.server.settings import ServerSettings

__all__ = ["ServerSecurity"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSecurity:
    """TLS (None: plaintext) and the access policy, checked at construction (see `from_settings`)."""

    tls: TlsFiles | None
    policy: AccessPolicy
    loopback: bool

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ServerSecurity:
        """Read and check the security settings' files and values.

        Raises ValueError naming the setting (and the path) for anything that cannot be served: see `load_tls`,
        `AccessPolicy.create`.
        """
        host = settings.address.rpartition(":")[0]
        loopback = is_loopback(host)
        tls = load_tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        policy = AccessPolicy.create(
            auth_token=settings.auth_token,
            auth_token_file=settings.auth_token_file,
            admin_identities=settings.admin_identities,
            auth_inference=settings.auth_inference,
            mutual_tls=tls is not None and tls.mutual,
            loopback=loopback,
        )
        return cls(tls, policy, loopback)

    def interceptor(self) -> AuthInterceptor:
        """The interceptor that enforces the policy; it goes after the ErrorInterceptor (see its docstring)."""
        return AuthInterceptor(self.policy)

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Bind `address` with TLS when configured, else plaintext; return the port (0 when binding failed)."""
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.tls.server_credentials())

    def warnings(self) -> list[str]:
        """What an operator should hear about at startup: exposures the settings leave open."""
        notes: list[str] = []
        if self.loopback:
            return notes
        if not self.policy.configured:
            notes.append(
                "no auth_token or admin_identities: model load/unload calls will be refused (PERMISSION_DENIED)"
            )
        if self.tls is None:
            what = "the bearer token and all traffic travel" if self.policy.token else "all traffic travels"
            notes.append(f"no tls_cert/tls_key: {what} in plaintext")
        return notes

    def log_warnings(self) -> None:
        """Log `warnings()`."""
        for note in self.warnings():
            log.warning("security: %s", note)
