"""Transport security and access control: TLS / mutual TLS for the port, and who may call what.

- `ServerSecurity.from_settings`: what the server's settings ask for, checked at startup.
- `tls`: the server's certificate, key and client CA (`load_tls`).
- `auth`: the access classes of methods, the bearer token / client-certificate policy, and its interceptor.
"""

from __future__ import annotations

from tensorgate.server.security.auth import (
    Access,
    AccessPolicy,
    AuthInterceptor,
    classify,
)
from tensorgate.server.security.setup import ServerSecurity
from tensorgate.server.security.tls import TlsFiles, is_loopback, load_tls

__all__ = [
    "Access",
    "AccessPolicy",
    "AuthInterceptor",
    "ServerSecurity",
    "TlsFiles",
    "classify",
    "is_loopback",
    "load_tls",
]
