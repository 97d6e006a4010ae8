"""TLS, mutual TLS, bearer tokens and admin identities on a real server, with real clients and the CLI."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tensorgate.client import AsyncClient, Client
from tensorgate.client.cli import main as cli_main
from tensorgate.client.errors import PermissionDeniedError, UnauthenticatedError, UnavailableError
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import grpc_service_pb2_grpc as pb_grpc
from tests.support.certificates import Issued, Pki
from tests.support.serving import ServerThread, copy_models, running_server

TOKEN = "integration-token-7f3a9c"
SPARE = "spare"  # the model the load/unload tests unload and load again
INPUTS = {"a": np.ones((1, 4), np.float32), "b": np.full((1, 4), 2.0, np.float32)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def _repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = copy_models(tmp_path_factory.mktemp("repository"), "add_sub")
    shutil.copytree(repository / "add_sub", repository / SPARE)
    return repository


def _serve(repository: Path, pki: Pki, **settings: Any) -> Iterator[ServerThread]:
    with running_server(
        repository, tls_cert=str(pki.server.cert_path), tls_key=str(pki.server.key_path), **settings
    ) as server:
        yield server


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """TLS, a bearer token for state-changing calls, inference open."""
    yield from _serve(_repository(tmp_path_factory), pki, auth_token=TOKEN)


@pytest.fixture(scope="module")
def guarded_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """TLS, the token from a file, and auth_inference: inference needs the token too."""
    token_file = tmp_path_factory.mktemp("secrets") / "token"
    token_file.write_text(TOKEN + "\n")
    yield from _serve(_repository(tmp_path_factory), pki, auth_token_file=str(token_file), auth_inference=True)


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """Mutual TLS: client certificates from the test CA required; CN admin or SAN ops.example may load/unload."""
    yield from _serve(
        _repository(tmp_path_factory),
        pki,
        tls_client_ca=str(pki.ca.cert_path),
        admin_identities="admin, ops.example",
    )


def _channel(
    server: ServerThread, ca: Issued | None, client: Issued | None = None, *, token: str | None = None
) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else ca.cert_pem,
        private_key=None if client is None else client.key_pem,
        certificate_chain=None if client is None else client.cert_pem,
    )
    if token is not None:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(server.address, credentials)


def _failure(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    error: Any = caught.value
    return error.code(), error.details()


def _health(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    status: int = reply.status
    return status


def _reload(stub: pb_grpc.GRPCInferenceServiceStub, metadata: Any = None) -> None:
    """Unload and load the spare model again (so each test leaves it loaded)."""
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=SPARE), timeout=60, metadata=metadata)
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=SPARE), timeout=60, metadata=metadata)


def _add(client: Client, model: str = "add_sub") -> list[float]:
    outputs = client.predict(model, INPUTS)
    return [float(value) for value in np.asarray(outputs["sum"]).ravel()]


# TLS --------------------------------------------------------------------------------------------------------


def test_tls_calls_work_with_the_right_ca(tls_server: ServerThread, pki: Pki) -> None:
    with Client(tls_server.address, root_certificates=pki.ca.cert_path, timeout=30) as client:
        assert client.health() == "SERVING"
        assert _add(client) == [3.0] * 4


def test_a_client_trusting_another_ca_cannot_connect(tls_server: ServerThread, pki: Pki) -> None:
    with (
        Client(tls_server.address, root_certificates=pki.other_ca.cert_pem, timeout=10) as client,
        pytest.raises(UnavailableError),
    ):
        client.health()


def test_a_plaintext_client_cannot_talk_to_a_tls_server(tls_server: ServerThread) -> None:
    with Client(tls_server.address, timeout=10) as client, pytest.raises(UnavailableError):
        client.health()


def test_an_expired_server_certificate_is_refused(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> None:
    repository = copy_models(tmp_path_factory.mktemp("expired"), "add_sub")
    with (
        running_server(
            repository, tls_cert=str(pki.expired_server.cert_path), tls_key=str(pki.expired_server.key_path)
        ) as server,
        Client(server.address, root_certificates=pki.ca.cert_pem, timeout=10) as client,
        pytest.raises(UnavailableError),
    ):
        client.health()
    # Same CA, same names as tls_server's certificate, which works: only the dates differ.
    assert pki.expired_server.certificate.not_valid_after_utc < datetime.now(UTC)


# Bearer token -----------------------------------------------------------------------------------------------


def test_load_and_unload_need_the_token(tls_server: ServerThread, pki: Pki) -> None:
    with _channel(tls_server, pki.ca) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        load = pb.RepositoryModelLoadRequest(model_name=SPARE)
        unload = pb.RepositoryModelUnloadRequest(model_name=SPARE)

        code, details = _failure(stub.RepositoryModelLoad, load)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "'authorization: Bearer <token>'" in details
        assert _failure(stub.RepositoryModelUnload, unload)[0] == grpc.StatusCode.UNAUTHENTICATED

        code, details = _failure(
            lambda request, timeout: stub.RepositoryModelUnload(
                request, timeout=timeout, metadata=(("authorization", "Bearer not-the-token"),)
            ),
            unload,
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "not accepted" in details
        assert "not-the-token" not in details
        # Refused calls changed nothing: the spare model still serves.
        with Client(tls_server.address, root_certificates=pki.ca.cert_pem, timeout=30) as client:
            assert client.ready(SPARE)


def test_load_and_unload_with_the_token(tls_server: ServerThread, pki: Pki) -> None:
    # As call credentials (the way gRPC clients in other languages send tokens) and as plain metadata.
    with _channel(tls_server, pki.ca, token=TOKEN) as channel:
        _reload(pb_grpc.GRPCInferenceServiceStub(channel))
    with _channel(tls_server, pki.ca) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        _reload(stub, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert {m.name: m.state for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}[
            SPARE
        ] == "READY"


def test_inference_health_and_reflection_stay_open(tls_server: ServerThread, pki: Pki) -> None:
    with Client(tls_server.address, root_certificates=pki.ca.cert_pem, timeout=30) as client:
        assert _add(client, SPARE) == [3.0] * 4
        assert {model.name for model in client.models()} == {"add_sub", SPARE}
    with _channel(tls_server, pki.ca) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = [service.name for reply in replies for service in reply.list_services_response.service]
        assert "inference.GRPCInferenceService" in services


# auth_inference ---------------------------------------------------------------------------------------------


def test_auth_inference_guards_inference(guarded_server: ServerThread, pki: Pki) -> None:
    with Client(guarded_server.address, root_certificates=pki.ca.cert_pem, timeout=30) as client:
        with pytest.raises(UnauthenticatedError, match="auth_inference"):
            _add(client)
        with pytest.raises(UnauthenticatedError):
            client.models()
        with pytest.raises(UnauthenticatedError):
            list(client.stream("add_sub", [INPUTS]))
        assert client.health() == "SERVING"  # probes stay open
        assert client.ready("add_sub")
    with (
        Client(guarded_server.address, root_certificates=pki.ca.cert_pem, token="wrong", timeout=30) as client,
        pytest.raises(PermissionDeniedError),
    ):
        _add(client)
    with Client(guarded_server.address, root_certificates=pki.ca.cert_pem, token=TOKEN, timeout=30) as client:
        assert _add(client) == [3.0] * 4
        assert [result.ok for result in client.stream("add_sub", [INPUTS, INPUTS], policy="block")] == [True, True]
    with _channel(guarded_server, pki.ca) as channel:
        code, _ = _failure(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, pb.ModelInferRequest())
        assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_async_client_sends_tls_and_token(guarded_server: ServerThread, pki: Pki) -> None:
    async with AsyncClient(guarded_server.address, root_certificates=pki.ca.cert_path, timeout=30) as client:
        with pytest.raises(UnauthenticatedError):
            await client.predict("add_sub", INPUTS)
    async with AsyncClient(
        guarded_server.address, root_certificates=pki.ca.cert_path, token=TOKEN, timeout=30
    ) as client:
        outputs = await client.predict("add_sub", INPUTS)
        np.testing.assert_allclose(outputs["sum"], INPUTS["a"] + INPUTS["b"])


def test_cli_with_tls_ca_and_token(
    guarded_server: ServerThread, pki: Pki, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("TENSORGATE_TOKEN", "TENSORGATE_TOKEN_FILE", "TENSORGATE_CLIENT_CERT", "TENSORGATE_CLIENT_KEY"):
        monkeypatch.delenv(variable, raising=False)
    connect = ["--address", guarded_server.address, "--tls-ca", str(pki.ca.cert_path)]

    assert cli_main(["models", *connect]) == 1
    assert "error: UNAUTHENTICATED: " in capsys.readouterr().err
    assert cli_main(["models", *connect, "--token", "wrong"]) == 1
    assert "error: PERMISSION_DENIED: " in capsys.readouterr().err
    assert cli_main(["models", *connect, "--token", TOKEN]) == 0
    assert SPARE in capsys.readouterr().out

    # The same from the environment, and a token file.
    monkeypatch.setenv("TENSORGATE_ADDRESS", guarded_server.address)
    monkeypatch.setenv("TENSORGATE_TLS_CA", str(pki.ca.cert_path))
    monkeypatch.setenv("TENSORGATE_TOKEN", TOKEN)
    inputs = pki.directory / "inputs.json"
    inputs.write_text('{"a": [[1, 2, 3, 4]], "b": [[4, 3, 2, 1]]}')
    assert cli_main(["predict", "add_sub", "--json", str(inputs)]) == 0  # metadata (for the dtypes), then predict
    assert "sum: FP32 [1, 4]" in capsys.readouterr().out
    right_file = pki.directory / "cli-right-token"
    right_file.write_text(TOKEN + "\n")
    monkeypatch.delenv("TENSORGATE_TOKEN")
    monkeypatch.setenv("TENSORGATE_TOKEN_FILE", str(right_file))
    assert cli_main(["metadata", "add_sub"]) == 0
    assert "add_sub" in capsys.readouterr().out
    monkeypatch.setenv("TENSORGATE_TOKEN", TOKEN)
    token_file = pki.directory / "cli-token"
    token_file.write_text("wrong\n")
    assert cli_main(["models", "--token-file", str(token_file)]) == 1  # the flag wins over $TENSORGATE_TOKEN
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert cli_main(["models", "--token", TOKEN, "--token-file", str(token_file)]) == 2
    assert "give --token or --token-file, not both" in capsys.readouterr().err


# Mutual TLS -------------------------------------------------------------------------------------------------


def test_mtls_without_a_client_certificate_fails(mtls_server: ServerThread, pki: Pki) -> None:
    with (
        Client(mtls_server.address, root_certificates=pki.ca.cert_pem, timeout=10) as client,
        pytest.raises(UnavailableError),
    ):
        client.health()


def test_mtls_with_a_certificate_from_another_ca_fails(mtls_server: ServerThread, pki: Pki) -> None:
    foreign = pki.foreign_client  # CN=admin, but issued by the other CA
    with (
        Client(
            mtls_server.address,
            root_certificates=pki.ca.cert_pem,
            private_key=foreign.key_pem,
            certificate_chain=foreign.cert_pem,
            timeout=10,
        ) as client,
        pytest.raises(UnavailableError),
    ):
        client.health()


def test_mtls_with_the_right_certificate_works(mtls_server: ServerThread, pki: Pki) -> None:
    viewer = pki.client("viewer")
    with Client(
        mtls_server.address,
        root_certificates=pki.ca.cert_path,
        private_key=viewer.key_path,
        certificate_chain=viewer.cert_path,
        timeout=30,
    ) as client:
        assert client.health() == "SERVING"
        assert _add(client) == [3.0] * 4


def test_the_cli_takes_its_client_certificate_from_its_own_variables(
    mtls_server: ServerThread, pki: Pki, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's TENSORGATE_TLS_CERT/KEY (its own certificate) in the same shell must not become the client's.
    viewer = pki.client("viewer")
    monkeypatch.setenv("TENSORGATE_TLS_CERT", str(pki.server.cert_path))
    monkeypatch.setenv("TENSORGATE_TLS_KEY", str(pki.server.key_path))
    monkeypatch.setenv("TENSORGATE_CLIENT_CERT", str(viewer.cert_path))
    monkeypatch.setenv("TENSORGATE_CLIENT_KEY", str(viewer.key_path))
    monkeypatch.delenv("TENSORGATE_TOKEN", raising=False)
    assert cli_main(["health", "--address", mtls_server.address, "--tls-ca", str(pki.ca.cert_path)]) == 0
    assert "SERVING" in capsys.readouterr().out


def test_only_admin_identities_may_load_and_unload(mtls_server: ServerThread, pki: Pki) -> None:
    with _channel(mtls_server, pki.ca, pki.client("viewer")) as channel:
        code, details = _failure(
            pb_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload,
            pb.RepositoryModelUnloadRequest(model_name=SPARE),
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "(viewer) is not in admin_identities" in details
    for admin in (pki.client("admin"), pki.client("deployer", dns_names=("ops.example",))):
        with _channel(mtls_server, pki.ca, admin) as channel:
            _reload(pb_grpc.GRPCInferenceServiceStub(channel))
