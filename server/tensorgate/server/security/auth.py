"""Who may call what: a bearer token or a client-certificate identity guards the calls that change state.

Every method the server serves falls in one of three classes (`classify`):

- open: health checks, reflection and readiness probes (`ServerLive`, `ServerReady`, `ModelReady`, `Models.Ready`);
  never guarded, since meshes and orchestrators probe them without credentials.
- data: inference and the read-only model calls; open unless `auth_inference` is set, then guarded.
- admin: every other method of our services, today the Open Inference Protocol's `RepositoryModelLoad` and
  `RepositoryModelUnload`. A method nobody classified is admin, so a state-changing call added later is
  guarded from its first day.

A guarded call passes with `authorization: Bearer <auth_token>` metadata (compared in constant time), or over
mutual TLS with a client certificate whose subject CN or a SAN is in `admin_identities`. Without any credential:
UNAUTHENTICATED; with a wrong token or an identity not listed: PERMISSION_DENIED. Messages say what is needed
and never repeat a token.

With neither a token nor admin identities configured, admin calls are allowed only when the server listens on a
loopback address (a developer's machine, the tests); on any other address they are refused with
PERMISSION_DENIED naming the settings to set, so that a default deploy cannot be reconfigured by anyone who can
reach the port. The listening address decides, not the caller's: behind a sidecar every caller is local.
"""

from __future__ import annotations

import enum
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tensorgate.server.errors import PermissionDeniedError, UnauthenticatedError
from tensorgate.server.prechecks import with_precheck

__all__ = [
    "Access",
    "AccessPolicy",
    "AuthInterceptor",
    "bearer_tokens",
    "certificate_identities",
    "classify",
    "parse_identities",
    "read_token",
]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class Access(enum.Enum):
    """What a method needs (see the module docstring)."""

    OPEN = "open"
    DATA = "data"
    ADMIN = "admin"


_OIP = "/inference.GRPCInferenceService/"
_V1 = "/tensorgate.v1."
#: Methods of our own services that stay open (probes).
_PROBES = frozenset(
    {
        f"{_OIP}ServerLive",
        f"{_OIP}ServerReady",
        f"{_OIP}ModelReady",
        f"{_V1}Models/Ready",
    }
)
#: Inference and read-only calls: open unless `auth_inference`.
_DATA = frozenset(
    {
        f"{_V1}Predict/Predict",
        f"{_V1}Stream/Stream",
        f"{_V1}Models/List",
        f"{_V1}Models/Metadata",
        f"{_OIP}ModelInfer",
        f"{_OIP}ModelStreamInfer",
        f"{_OIP}ServerMetadata",
        f"{_OIP}ModelMetadata",
        f"{_OIP}ModelConfig",
        f"{_OIP}ModelStatistics",
        f"{_OIP}RepositoryIndex",
    }
)
#: Services whose unclassified methods are admin; anything else (health, reflection) is open.
_GUARDED_PREFIXES = ("/tensorgate.", "/inference.")


def classify(method: str) -> Access:
    """The access class of a full method name such as "/inference.GRPCInferenceService/RepositoryModelLoad"."""
    if method in _PROBES or not method.startswith(_GUARDED_PREFIXES):
        return Access.OPEN
    if method in _DATA:
        return Access.DATA
    return Access.ADMIN


def bearer_tokens(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[list[str], bool]:
    """The bearer tokens in a call's `authorization` metadata, and whether some value was not a bearer token.

    The scheme is case-insensitive ("Bearer", "bearer"), as in RFC 6750; an empty token is malformed.
    """
    tokens: list[str] = []
    malformed = False
    for key, value in metadata:
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            tokens.append(token)
        else:
            malformed = True
    return tokens, malformed


#: auth_context keys that carry a verified client certificate's names: the subject CN and each SAN (newer gRPC
#: also files SANs by type under peer_*).
_IDENTITY_KEYS = (
    "x509_common_name",
    "x509_subject_alternative_name",
    "peer_dns",
    "peer_uri",
    "peer_email",
    "peer_ip",
)


def certificate_identities(auth_context: Mapping[str, Iterable[bytes]]) -> frozenset[str]:
    """The subject CN and SAN values of the peer's verified client certificate (empty without one)."""
    names: set[str] = set()
    for key in _IDENTITY_KEYS:
        for value in auth_context.get(key, ()):
            names.add(value.decode("utf-8", errors="replace"))
    names.discard("")
    return frozenset(names)


def parse_identities(text: str) -> frozenset[str]:
    """`admin_identities`: comma-separated names; blanks around names and empty items are ignored."""
    return frozenset(name.strip() for name in text.split(",") if name.strip())


def _valid_token(token: str) -> bool:
    # It travels in a metadata value: printable ASCII, and without spaces, so that "Bearer <token>" parses.
    return bool(token) and all("!" <= char <= "~" for char in token)


def read_token(auth_token: str, auth_token_file: str) -> str | None:
    """The configured bearer token, from `auth_token` or the file `auth_token_file` (one line); None if neither.

    Raises ValueError (never showing the token) for both set, an unreadable or empty file, or a token that is
    not printable ASCII without spaces.
    """
    if auth_token and auth_token_file:
        raise ValueError("set auth_token or auth_token_file, not both")
    setting = "auth_token"
    token = auth_token
    if auth_token_file:
        setting = "auth_token_file"
        try:
            token = Path(auth_token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise ValueError(f"auth_token_file: cannot read {auth_token_file}: {reason}") from None
        if not token:
            raise ValueError(f"auth_token_file: {auth_token_file} is empty")
    if not token:
        return None
    if not _valid_token(token):
        raise ValueError(f"{setting}: the token must be printable ASCII without spaces (it travels as metadata)")
    return token


@dataclass(frozen=True)
class AccessPolicy:
    """The server's access rules (see the module docstring). `check` raises for a call that may not proceed.

    Attributes:
        token: the bearer token; None: no token accepted.
        admin_identities: client-certificate names (CN or SAN) allowed guarded calls without a token.
        auth_inference: guard data calls (inference, model listings and metadata) too.
        open_admin: with no credentials configured, whether admin calls are allowed (loopback only).
    """

    token: str | None = field(default=None, repr=False)
    admin_identities: frozenset[str] = frozenset()
    auth_inference: bool = False
    open_admin: bool = True

    @property
    def configured(self) -> bool:
        """Whether any credential can be checked (a token or admin identities)."""
        return self.token is not None or bool(self.admin_identities)

    @classmethod
    def create(
        cls,
        *,
        auth_token: str,
        auth_token_file: str,
        admin_identities: str,
        auth_inference: bool,
        mutual_tls: bool,
        loopback: bool,
    ) -> AccessPolicy:
        """The policy for these settings; ValueError for settings that cannot be enforced."""
        token = read_token(auth_token, auth_token_file)
        identities = parse_identities(admin_identities)
        if identities and not mutual_tls:
            raise ValueError(
                "admin_identities needs tls_client_ca: identities are read from verified client certificates"
            )
        policy = cls(token=token, admin_identities=identities, auth_inference=auth_inference, open_admin=loopback)
        if auth_inference and not policy.configured:
            raise ValueError(
                "auth_inference needs credentials to check: set auth_token (or auth_token_file), or "
                "admin_identities with tls_client_ca"
            )
        return policy

    def needs_check(self, access: Access) -> bool:
        """Whether calls of this class are checked at all (if not, they pass untouched)."""
        if access is Access.ADMIN:
            return self.configured or not self.open_admin
        return access is Access.DATA and self.auth_inference

    def _needed(self) -> str:
        ways = []
        if self.token is not None:
            ways.append("metadata 'authorization: Bearer <token>' with the server's auth_token")
        if self.admin_identities:
            ways.append("a client certificate whose CN or SAN is in the server's admin_identities")
        return " or ".join(ways)

    def check(
        self,
        method: str,
        metadata: Iterable[tuple[str, str | bytes]],
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> None:
        """Raise UnauthenticatedError or PermissionDeniedError unless the call may proceed."""
        access = classify(method)
        if not self.needs_check(access):
            return
        if not self.configured:
            raise PermissionDeniedError(
                f"{method} changes the server's state and is refused: no credentials are configured and the "
                "server does not listen on loopback; set auth_token (or auth_token_file), or admin_identities "
                "with tls_client_ca"
            )
        tokens, malformed = bearer_tokens(metadata)
        if self.token is not None:
            expected = self.token.encode("ascii")
            # compare_digest takes as long whatever the mismatch, so timing does not reveal the token.
            if any(hmac.compare_digest(token.encode("utf-8"), expected) for token in tokens):
                return
        identities = certificate_identities(auth_context) if self.admin_identities else frozenset()
        if identities & self.admin_identities:
            return
        what = "changes the server's state" if access is Access.ADMIN else "needs credentials (auth_inference)"
        if tokens:
            accepted = "is not accepted" if self.token is not None else "cannot be checked: the server has no token"
            raise PermissionDeniedError(f"{method} {what}: the bearer token {accepted}; send {self._needed()}")
        if identities:
            names = ", ".join(sorted(identities))
            raise PermissionDeniedError(
                f"{method} {what}: the client certificate ({names}) is not in admin_identities; send {self._needed()}"
            )
        if malformed:
            raise UnauthenticatedError(
                f"{method} {what}: the authorization metadata is not 'Bearer <token>'; send {self._needed()}"
            )
        raise UnauthenticatedError(f"{method} {what}: send {self._needed()}")


def _metadata(context: Context) -> list[tuple[str, str | bytes]]:
    return [(item[0], item[1]) for item in context.invocation_metadata() or ()]


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Enforces an `AccessPolicy` on every call, before its handler runs.

    The check runs inside the handler, where the call's context (its TLS peer) is known, and raises the
    policy's errors, which the ErrorInterceptor maps to status codes. So this interceptor sits inside it (after
    it in the server's list). Its wrapping depends only on the method, so the ErrorInterceptor's per-method
    handler cache keeps it correct. Methods that need no check are passed through untouched.
    """

    def __init__(self, policy: AccessPolicy) -> None:
        self.policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not self.policy.needs_check(classify(method)):
            return handler
        return self._wrap(method, handler)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        policy = self.policy

        def check(context: Context) -> None:
            policy.check(method, _metadata(context), context.auth_context())

        return with_precheck(handler, check)
