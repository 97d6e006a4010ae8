"""Security without sockets: method classes, token parsing, identity matching, the access policy's decisions,
the startup checks of the TLS and auth settings, and the client's token handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorgate.client import _common
from tensorgate.oip import grpc_service_pb2
from tensorgate.server.app import Server
from tensorgate.server.errors import PermissionDeniedError, UnauthenticatedError
from tensorgate.server.security import (
    Access,
    AccessPolicy,
    ServerSecurity,
    classify,
    is_loopback,
    load_tls,
)
from tensorgate.server.security.auth import bearer_tokens, certificate_identities, parse_identities, read_token
from tensorgate.server.settings import ServerSettings
from tensorgate.v1 import models_pb2, predict_pb2, stream_pb2
from tests.support.certificates import Pki

TOKEN = "s3cret-token_0123456789"
LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"
INFER = "/inference.GRPCInferenceService/ModelInfer"
CLIENT_CERT = {"x509_common_name": [b"admin"], "x509_subject_alternative_name": [b"ops.example"]}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


# Method classes ---------------------------------------------------------------------------------------------


def _served_methods() -> list[str]:
    services = [
        predict_pb2.DESCRIPTOR.services_by_name["Predict"],
        stream_pb2.DESCRIPTOR.services_by_name["Stream"],
        models_pb2.DESCRIPTOR.services_by_name["Models"],
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    ]
    return [f"/{service.full_name}/{method.name}" for service in services for method in service.methods]


def test_exactly_the_state_changing_methods_are_admin() -> None:
    # A new method is admin until classified: this fails for a new read-only method, so that it gets a class.
    methods = _served_methods()
    admin = {m for m in methods if classify(m) is Access.ADMIN}

    assert admin == {m for m in methods if m.endswith(("Load", "Unload"))}
    assert LOAD in admin
    assert "/inference.GRPCInferenceService/RepositoryModelUnload" in admin


@pytest.mark.parametrize(
    ("method", "access"),
    [
        ("/grpc.health.v1.Health/Check", Access.OPEN),
        ("/grpc.health.v1.Health/Watch", Access.OPEN),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Access.OPEN),
        ("/inference.GRPCInferenceService/ServerLive", Access.OPEN),
        ("/inference.GRPCInferenceService/ModelReady", Access.OPEN),
        ("/tensorgate.v1.Models/Ready", Access.OPEN),
        ("/tensorgate.v1.Predict/Predict", Access.DATA),
        ("/tensorgate.v1.Stream/Stream", Access.DATA),
        ("/tensorgate.v1.Models/List", Access.DATA),
        (INFER, Access.DATA),
        ("/inference.GRPCInferenceService/RepositoryIndex", Access.DATA),
        (LOAD, Access.ADMIN),
        ("/tensorgate.v1.Models/Load", Access.ADMIN),  # not served today: unclassified methods are admin
    ],
)
def test_classify(method: str, access: Access) -> None:
    assert classify(method) is access


# Parsing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "tokens", "malformed"),
    [
        ([], [], False),
        ([("x-client-id", "cam-1")], [], False),
        ([("authorization", f"Bearer {TOKEN}")], [TOKEN], False),
        ([("authorization", f"bearer   {TOKEN} ")], [TOKEN], False),
        ([("Authorization", f"BEARER {TOKEN}".encode())], [TOKEN], False),
        ([("authorization", TOKEN)], [], True),
        ([("authorization", "Basic dXNlcjpwYXNz")], [], True),
        ([("authorization", "Bearer ")], [], True),
        ([("authorization", "Basic x"), ("authorization", "Bearer t2")], ["t2"], True),
    ],
)
def test_bearer_tokens(metadata: list[tuple[str, str | bytes]], tokens: list[str], malformed: bool) -> None:
    assert bearer_tokens(metadata) == (tokens, malformed)


def test_certificate_identities_are_the_cn_and_every_san() -> None:
    context = {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [b"admin"],
        "x509_subject_alternative_name": [b"ops.example", b"127.0.0.1"],
        "peer_dns": [b"ops.example"],
        "x509_pem_cert": [b"-----BEGIN CERTIFICATE-----..."],
    }

    assert certificate_identities(context) == {"admin", "ops.example", "127.0.0.1"}
    assert certificate_identities({"transport_security_type": [b"insecure"]}) == frozenset()


def test_parse_identities() -> None:
    assert parse_identities(" admin, ops.example ,,spiffe://cluster/ns/x ") == {
        "admin",
        "ops.example",
        "spiffe://cluster/ns/x",
    }
    assert parse_identities("") == frozenset()


def test_read_token_from_the_setting_or_a_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")

    assert read_token(TOKEN, "") == TOKEN
    assert read_token("", str(path)) == TOKEN
    assert read_token("", "") is None


@pytest.mark.parametrize(
    ("token", "contents", "message"),
    [
        (TOKEN, TOKEN, "not both"),
        ("", None, "auth_token_file: cannot read .*missing"),
        ("", "\n", "auth_token_file: .* is empty"),
        ("", "two words", "auth_token_file: the token must be printable ASCII without spaces"),
        ("tökén", None, "auth_token: the token must be printable ASCII"),
    ],
)
def test_bad_tokens_are_refused_without_showing_them(
    tmp_path: Path, token: str, contents: str | None, message: str
) -> None:
    path = tmp_path / "missing"
    if contents is not None:
        path.write_text(contents)
    token_file = str(path) if contents is not None or not token else ""

    with pytest.raises(ValueError, match=message) as caught:
        read_token(token, token_file)
    assert TOKEN not in str(caught.value)
    assert "two words" not in str(caught.value)


# Policy -----------------------------------------------------------------------------------------------------


def _denied(policy: AccessPolicy, method: str, metadata: list[tuple[str, str]], context: dict[str, list[bytes]]) -> str:
    with pytest.raises((UnauthenticatedError, PermissionDeniedError)) as caught:
        policy.check(method, metadata, context)
    return f"{caught.value.code}: {caught.value}"


def test_token_policy_decisions() -> None:
    policy = AccessPolicy(token=TOKEN)
    bearer = [("authorization", f"Bearer {TOKEN}")]

    policy.check(LOAD, bearer, {})
    policy.check(INFER, [], {})  # inference is open by default
    policy.check("/grpc.health.v1.Health/Check", [], {})
    missing = _denied(policy, LOAD, [], {})
    assert missing.startswith("UNAUTHENTICATED: ")
    assert "'authorization: Bearer <token>'" in missing
    assert "auth_token" in missing
    wrong = _denied(policy, LOAD, [("authorization", "Bearer nope-nope")], {})
    assert wrong.startswith("PERMISSION_DENIED: ")
    assert "not accepted" in wrong
    assert "nope-nope" not in wrong
    assert _denied(policy, LOAD, [("authorization", f"Basic {TOKEN}")], {}).startswith("UNAUTHENTICATED: ")
    # A certificate is no credential when no identities are configured: the token is still missing.
    assert _denied(policy, LOAD, [], CLIENT_CERT).startswith("UNAUTHENTICATED: ")


def test_token_is_compared_whole() -> None:
    policy = AccessPolicy(token=TOKEN)

    for near in (TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
        assert _denied(policy, LOAD, [("authorization", f"Bearer {near}")], {}).startswith("PERMISSION_DENIED")


def test_identity_policy_decisions() -> None:
    policy = AccessPolicy(admin_identities=frozenset({"ops.example"}))

    policy.check(LOAD, [], CLIENT_CERT)  # matched by a SAN
    AccessPolicy(admin_identities=frozenset({"admin"})).check(LOAD, [], CLIENT_CERT)  # by the CN
    other = _denied(policy, LOAD, [], {"x509_common_name": [b"viewer"]})
    assert other.startswith("PERMISSION_DENIED: ")
    assert "(viewer) is not in admin_identities" in other
    assert _denied(policy, LOAD, [], {}).startswith("UNAUTHENTICATED: ")
    # A token where the server has none is refused, and says so.
    assert "the server has no token" in _denied(policy, LOAD, [("authorization", "Bearer t")], {})


def test_either_credential_passes_when_both_are_configured() -> None:
    policy = AccessPolicy(token=TOKEN, admin_identities=frozenset({"admin"}))

    policy.check(LOAD, [("authorization", f"Bearer {TOKEN}")], {"x509_common_name": [b"viewer"]})
    policy.check(LOAD, [("authorization", "Bearer wrong")], CLIENT_CERT)
    assert _denied(policy, LOAD, [], {"x509_common_name": [b"viewer"]}).startswith("PERMISSION_DENIED")


def test_auth_inference_guards_data_but_not_probes() -> None:
    policy = AccessPolicy(token=TOKEN, auth_inference=True)

    assert _denied(policy, INFER, [], {}).startswith("UNAUTHENTICATED: ")
    assert "auth_inference" in _denied(policy, "/tensorgate.v1.Models/List", [], {})
    policy.check(INFER, [("authorization", f"Bearer {TOKEN}")], {})
    policy.check("/inference.GRPCInferenceService/ServerReady", [], {})
    policy.check("/grpc.health.v1.Health/Check", [], {})


def test_without_credentials_admin_calls_are_open_only_on_loopback() -> None:
    AccessPolicy(open_admin=True).check(LOAD, [], {})
    refused = _denied(AccessPolicy(open_admin=False), LOAD, [("authorization", "Bearer x")], {})

    assert refused.startswith("PERMISSION_DENIED: ")
    assert "set auth_token" in refused
    AccessPolicy(open_admin=False).check(INFER, [], {})  # inference stays open


def test_policy_repr_hides_the_token() -> None:
    assert TOKEN not in repr(AccessPolicy(token=TOKEN))
    assert TOKEN not in repr(ServerSettings(auth_token=TOKEN))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("localhost", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("", False),
        ("10.0.0.5", False),
        ("tensorgate.internal", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# Startup checks ---------------------------------------------------------------------------------------------


def _security(**settings: str) -> ServerSecurity:
    return ServerSecurity.from_settings(ServerSettings().with_values(settings))


def test_tls_settings_are_loaded(pki: Pki) -> None:
    plain = load_tls("", "", "")
    tls = load_tls(str(pki.server.cert_path), str(pki.server.key_path), "")
    mutual = load_tls(str(pki.server.cert_path), str(pki.server.key_path), str(pki.ca.cert_path))

    assert plain is None
    assert tls is not None
    assert not tls.mutual
    assert tls.certificate_chain == pki.server.cert_pem
    assert mutual is not None
    assert mutual.mutual
    assert mutual.client_ca == pki.ca.cert_pem


def test_tls_startup_errors_name_the_setting_and_path(pki: Pki, tmp_path: Path) -> None:
    cert, key, ca = str(pki.server.cert_path), str(pki.server.key_path), str(pki.ca.cert_path)
    missing = str(tmp_path / "nope.pem")
    cases = {
        (cert, "", ""): "tls_cert is set .* but tls_key is not",
        ("", key, ""): "tls_key is set .* but tls_cert is not",
        ("", "", ca): "tls_client_ca .* needs tls_cert and tls_key",
        (missing, key, ""): f"tls_cert: cannot read {missing}: No such file",
        (cert, missing, ""): f"tls_key: cannot read {missing}",
        (cert, key, missing): f"tls_client_ca: cannot read {missing}",
        (key, key, ""): f"tls_cert: {key} holds no PEM certificate",
        (cert, cert, ""): f"tls_key: {cert} holds no PEM private key",
        (cert, str(pki.other_ca.key_path), ""): "tls_key: .* is not the private key of the certificate",
        (cert, key, key): f"tls_client_ca: {key} holds no PEM certificate",
        (cert, key, str(tmp_path)): f"tls_client_ca: cannot read {tmp_path}",
    }
    for (tls_cert, tls_key, tls_client_ca), message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_tls(tls_cert, tls_key, tls_client_ca)


def test_an_encrypted_key_is_refused(pki: Pki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        pki.server.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )

    with pytest.raises(ValueError, match=f"tls_key: {encrypted} is encrypted"):
        load_tls(str(pki.server.cert_path), str(encrypted), "")


def test_auth_settings_that_cannot_be_enforced_are_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="admin_identities needs tls_client_ca"):
        _security(admin_identities="admin")
    with pytest.raises(ValueError, match="admin_identities needs tls_client_ca"):
        _security(admin_identities="admin", tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path))
    with pytest.raises(ValueError, match="auth_inference needs credentials"):
        _security(auth_inference="true")


def test_security_from_settings(pki: Pki) -> None:
    default = _security()
    mutual = _security(
        address="0.0.0.0:8001",
        tls_cert=str(pki.server.cert_path),
        tls_key=str(pki.server.key_path),
        tls_client_ca=str(pki.ca.cert_path),
        admin_identities="admin,ops",
        auth_inference="true",
    )

    assert default.tls is None
    assert default.policy == AccessPolicy(open_admin=True)
    assert default.warnings() == []
    assert mutual.tls is not None
    assert mutual.tls.mutual
    assert mutual.policy.admin_identities == {"admin", "ops"}
    assert mutual.policy.auth_inference
    assert not mutual.policy.open_admin
    assert mutual.warnings() == []


def test_exposed_defaults_are_warned_about() -> None:
    warnings = _security(address="0.0.0.0:8001").warnings()
    token_warnings = _security(address="10.1.2.3:8001", auth_token=TOKEN).warnings()

    assert any("model load/unload calls will be refused" in w for w in warnings)
    assert any("all traffic travels in plaintext" in w for w in warnings)
    assert token_warnings == ["no tls_cert/tls_key: the bearer token and all traffic travel in plaintext"]


def test_settings_come_from_flags_and_variables(tmp_path: Path) -> None:
    settings = ServerSettings.from_sources(
        {"tls_cert": "/certs/server.crt", "auth_inference": "yes"},
        environ={"TENSORGATE_AUTH_TOKEN_FILE": "/run/secrets/token", "TENSORGATE_ADMIN_IDENTITIES": "a,b"},
    )

    assert settings.tls_cert == "/certs/server.crt"
    assert settings.auth_inference is True
    assert settings.auth_token_file == "/run/secrets/token"
    assert settings.admin_identities == "a,b"


def test_the_server_refuses_to_start_with_bad_tls_settings(tmp_path: Path) -> None:
    missing = tmp_path / "server.crt"

    with pytest.raises(ValueError, match=f"tls_cert: cannot read {missing}"):
        Server(ServerSettings(repository=tmp_path, tls_cert=str(missing), tls_key=str(missing)))


# Client -----------------------------------------------------------------------------------------------------


def _client_settings(**kwargs: object) -> _common.ChannelSettings:
    arguments: dict[str, object] = {
        "tls": False,
        "root_certificates": None,
        "private_key": None,
        "certificate_chain": None,
        "options": (),
        "metadata": (),
    }
    arguments.update(kwargs)
    return _common.channel_settings("127.0.0.1:8001", **arguments)  # type: ignore[arg-type]


def test_client_token_becomes_bearer_metadata() -> None:
    settings = _client_settings(metadata=[("x-client-id", "cam")], token=f"{TOKEN}\n")

    assert settings.metadata == (("x-client-id", "cam"), ("authorization", f"Bearer {TOKEN}"))
    assert _client_settings().metadata == ()


@pytest.mark.parametrize("token", ["", "two words", "tökén"])
def test_client_refuses_tokens_that_cannot_travel(token: str) -> None:
    with pytest.raises(ValueError, match="printable ASCII without spaces"):
        _client_settings(token=token)


def test_client_token_is_given_once() -> None:
    with pytest.raises(ValueError, match="give the token once"):
        _client_settings(metadata=[("Authorization", "Bearer a")], token="b")
