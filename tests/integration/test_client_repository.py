"""`Client` / `AsyncClient` load, unload and repository, and the `tensorgate load|unload|repository` commands.

One real server for the module, with a bearer token guarding load/unload (inference stays open). Each test works
on its own model directories, written into the server's repository after it started.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from tensorgate.client import AsyncClient, Client, RepositoryEntry
from tensorgate.client.cli import main as cli_main
from tensorgate.client.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from tests.support.models import identity_model
from tests.support.serving import ServerThread, copy_models, running_server

TOKEN = "repository-token-4d1e"
ADD_SUB = RepositoryEntry("add_sub", 1, "READY", "")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repository = copy_models(tmp_path_factory.mktemp("repository"), "add_sub")
    with running_server(repository, auth_token=TOKEN) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.address, timeout=60, token=TOKEN) as admin:
        yield admin


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")  # as secrets are mounted: with a newline
    return path


def _add_model(server: ServerThread, name: str, onnx_type: int = TensorProto.FLOAT) -> Path:
    """Write `<repository>/<name>/1/model.onnx`, y = x over [batch, 2] (no config: derived from the model)."""
    return identity_model(server.settings.repository / name / "1" / "model.onnx", onnx_type)


def _entries(client: Client, name: str) -> list[RepositoryEntry]:
    return [entry for entry in client.repository() if entry.name == name]


def test_load_a_model_added_after_start_then_unload_it(server: ServerThread, client: Client) -> None:
    _add_model(server, "fresh")
    assert _entries(client, "fresh") == []  # on disk, not loaded: the server does not know it yet
    assert client.load("fresh") == [RepositoryEntry("fresh", 1, "READY", "")]
    x = np.array([[1.5, -2.0]], np.float32)
    np.testing.assert_array_equal(client.predict("fresh", {"x": x})["y"], x)

    client.unload("fresh")
    assert _entries(client, "fresh") == [RepositoryEntry("fresh", None, "UNAVAILABLE", "unloaded")]
    assert not client.ready("fresh")
    with pytest.raises(UnavailableError, match="unloaded"):
        client.predict("fresh", {"x": x})
    # ready=True lists what serves: the other model, not the unloaded one.
    assert ADD_SUB in client.repository(ready=True)
    assert all(entry.name != "fresh" for entry in client.repository(ready=True))


def test_load_reloads_a_model_whose_file_changed(server: ServerThread, client: Client) -> None:
    _add_model(server, "changing", TensorProto.FLOAT)
    client.load("changing")
    assert client.metadata("changing").input("x").dtype == "FP32"
    _add_model(server, "changing", TensorProto.INT32)  # the same path, a new model
    assert client.load("changing") == [RepositoryEntry("changing", 1, "READY", "")]
    assert client.metadata("changing").input("x").dtype == "INT32"
    x = np.array([[7, -3]], np.int32)
    np.testing.assert_array_equal(client.predict("changing", {"x": x})["y"], x)


def test_a_broken_model_fails_to_load_with_the_reason(server: ServerThread, client: Client) -> None:
    model = server.settings.repository / "broken" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"this is not an ONNX file")
    with pytest.raises(InvalidArgumentError) as caught:
        client.load("broken")
    assert "'broken' did not load" in caught.value.details
    assert str(model) in caught.value.details  # names the file at fault
    [entry] = _entries(client, "broken")
    assert (entry.version, entry.state, str(model) in entry.reason) == (1, "UNAVAILABLE", True)
    assert client.predict("add_sub", {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.float32)})


def test_a_failed_reload_keeps_the_serving_version(server: ServerThread, client: Client) -> None:
    path = _add_model(server, "steady")
    client.load("steady")
    path.write_bytes(b"truncated")
    with pytest.raises(InvalidArgumentError, match=r"model\.onnx"):
        client.load("steady")
    [entry] = _entries(client, "steady")
    assert (entry.version, entry.state) == (1, "READY")
    assert "previous load still serves" in entry.reason
    x = np.array([[1.0, 2.0]], np.float32)
    np.testing.assert_array_equal(client.predict("steady", {"x": x})["y"], x)


def test_unknown_models(client: Client) -> None:
    with pytest.raises(NotFoundError, match="missing"):
        client.load("missing")
    with pytest.raises(NotFoundError, match="missing"):
        client.unload("missing")
    with pytest.raises(InvalidArgumentError, match="directory"):
        client.load("../add_sub")
    with pytest.raises(ValueError, match="model"):
        client.load("")  # refused before any call


@pytest.mark.parametrize(
    ("token", "error"),
    [(None, UnauthenticatedError), ("wrong-token", PermissionDeniedError)],
    ids=["no-token", "wrong-token"],
)
def test_load_and_unload_need_the_token(
    server: ServerThread, client: Client, token: str | None, error: type[Exception]
) -> None:
    with Client(server.address, timeout=30, token=token) as outsider:
        with pytest.raises(error):
            outsider.load("add_sub")
        with pytest.raises(error):
            outsider.unload("add_sub")
        assert ADD_SUB in outsider.repository()  # the index is a read: open unless auth_inference
    assert client.repository(ready=True).count(ADD_SUB) == 1  # refused calls changed nothing
    assert client.load("add_sub") == [ADD_SUB]  # the right token passes


async def test_async_client(server: ServerThread) -> None:
    _add_model(server, "async_model")
    async with AsyncClient(server.address, timeout=30) as outsider:
        with pytest.raises(UnauthenticatedError, match="authorization"):
            await outsider.load("async_model")
        with pytest.raises(UnauthenticatedError):
            await outsider.unload("add_sub")
    async with AsyncClient(server.address, timeout=60, token=TOKEN) as admin:
        assert await admin.load("async_model") == [RepositoryEntry("async_model", 1, "READY", "")]
        assert RepositoryEntry("async_model", 1, "READY", "") in await admin.repository(ready=True)
        await admin.unload("async_model")
        assert RepositoryEntry("async_model", None, "UNAVAILABLE", "unloaded") in await admin.repository()
        with pytest.raises(NotFoundError):
            await admin.unload("missing")
        with pytest.raises(InvalidArgumentError):
            await admin.load("../add_sub")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli_main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_load_repository_unload(
    server: ServerThread, token_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TENSORGATE_TOKEN", "TENSORGATE_TOKEN_FILE", "TENSORGATE_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    _add_model(server, "cli_model")
    connect = ("--address", server.address, "--token-file", str(token_file))

    assert _cli(capsys, "load", "cli_model", *connect) == (0, "loaded cli_model: version 1 ready\n", "")
    status, out, _ = _cli(capsys, "repository", "--address", server.address)  # a read: no token needed
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "REASON"]
    assert ["cli_model", "1", "READY"] in [line.split() for line in lines]

    assert _cli(capsys, "unload", "cli_model", *connect) == (0, "unloaded cli_model\n", "")
    status, out, _ = _cli(capsys, "repository", "--address", server.address)
    assert ["cli_model", "-", "UNAVAILABLE", "unloaded"] in [line.split() for line in out.splitlines()]
    status, out, _ = _cli(capsys, "repository", "--ready", "--address", server.address)
    assert status == 0
    assert "cli_model" not in out
    assert "add_sub" in out


def test_cli_errors(
    server: ServerThread, token_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TENSORGATE_TOKEN", "TENSORGATE_TOKEN_FILE", "TENSORGATE_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    status, out, err = _cli(capsys, "load", "add_sub", "--address", server.address)
    assert (status, out) == (1, "")
    assert err.startswith("error: UNAUTHENTICATED: ")
    status, _, err = _cli(capsys, "unload", "add_sub", "--address", server.address, "--token", "not-it")
    assert (status, err.startswith("error: PERMISSION_DENIED: ")) == (1, True)
    status, _, err = _cli(capsys, "load", "missing", "--address", server.address, "--token-file", str(token_file))
    assert (status, err.startswith("error: NOT_FOUND: "), "missing" in err) == (1, True, True)
    # The token from the environment, as a deploy script would set it.
    monkeypatch.setenv("TENSORGATE_TOKEN_FILE", str(token_file))
    assert _cli(capsys, "load", "add_sub", "--address", server.address) == (0, "loaded add_sub: version 1 ready\n", "")


def test_cli_load_names_the_versions_that_failed(
    server: ServerThread, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _add_model(server, "cli_partial")
    directory = server.settings.repository / "cli_partial"
    (directory / "config.pbtxt").write_text("version_policy { all { } }\n")
    (directory / "2").mkdir()
    (directory / "2" / "model.onnx").write_bytes(b"garbage")
    connect = ("--address", server.address, "--token-file", str(token_file))
    # Version 1 serves, so the load succeeded; the line still says what did not load, and why.
    status, out, err = _cli(capsys, "load", "cli_partial", *connect)
    assert (status, err) == (0, "")
    assert out.startswith("loaded cli_partial: version 1 ready; version 2 UNAVAILABLE (")
    assert str(directory / "2" / "model.onnx") in out
    assert out.count("\n") == 1

    # A reload that fails keeps version 1 serving; the command fails with the server's reason.
    (directory / "1" / "model.onnx").write_bytes(b"garbage")
    status, out, err = _cli(capsys, "load", "cli_partial", *connect)
    assert (status, out) == (1, "")
    assert err.startswith("error: INVALID_ARGUMENT: model 'cli_partial' did not load: ")
    status, out, _ = _cli(capsys, "repository", "--ready", "--address", server.address)
    assert ["cli_partial", "1", "READY", "reload", "failed,"] in [line.split()[:5] for line in out.splitlines()]


def test_importing_the_client_leaves_the_oip_stubs_unloaded() -> None:
    # tritonclient registers the same protobuf package `inference`, so a program using both must be able to
    # import tensorgate.client; the stubs load only when a repository method is called.
    code = (
        "import sys, tensorgate.client, tensorgate.client.cli\n"
        "assert not [m for m in sys.modules if m.startswith('tensorgate.oip')], sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
