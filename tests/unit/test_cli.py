"""The `tensorgate` command without a server: parsing, local input, output, exit statuses (a fake Client)."""

from __future__ import annotations

import io
import json
import sys
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from tensorgate.client import cli
from tensorgate.client._common import ModelInfo, ModelMetadata, TensorInfo, VersionInfo
from tensorgate.client.errors import NotFoundError

DIGITS = ModelMetadata(
    name="digits",
    version=1,
    platform="onnxruntime_onnx",
    inputs=[TensorInfo("image", "FP32", (-1, 1, 8, 8))],
    outputs=[TensorInfo("probabilities", "FP32", (-1, 10)), TensorInfo("label", "INT64", (-1,))],
    max_batch_size=64,
    engine="onnxruntime (CPUExecutionProvider)",
)
ADD_SUB = ModelMetadata(
    name="add_sub",
    version=1,
    platform="onnxruntime_onnx",
    inputs=[TensorInfo("a", "FP32", (-1, 4)), TensorInfo("b", "FP32", (-1, 4))],
    outputs=[TensorInfo("sum", "FP32", (-1, 4)), TensorInfo("difference", "FP32", (-1, 4))],
    max_batch_size=64,
    engine="onnxruntime (CPUExecutionProvider)",
)


class FakeClient:
    """Stands in for `Client`: serves add_sub and digits from memory and records what it was asked."""

    instances: list[FakeClient] = []  # noqa: RUF012 (reset by the fixture)
    health_status = "SERVING"

    def __init__(self, address: str, **kwargs: Any) -> None:
        self.address = address
        self.kwargs = kwargs
        self.calls: list[tuple[str, Any]] = []
        self.closed = False
        FakeClient.instances.append(self)

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True

    def _model(self, model: str) -> ModelMetadata:
        if model == "digits":
            return DIGITS
        if model == "add_sub":
            return ADD_SUB
        raise NotFoundError(grpc.StatusCode.NOT_FOUND, f"model {model!r} is not in the repository")

    def metadata(self, model: str, *, version: int | None = None) -> ModelMetadata:
        self.calls.append(("metadata", (model, version)))
        return self._model(model)

    def predict(
        self,
        model: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        *,
        version: int | None = None,
        outputs: Iterable[str] | None = None,
    ) -> dict[str, npt.NDArray[Any]]:
        self.calls.append(("predict", (model, dict(inputs), version, outputs)))
        self._model(model)
        if model == "add_sub":
            result = {"sum": inputs["a"] + inputs["b"], "difference": inputs["a"] - inputs["b"]}
        else:
            batch = inputs["image"].shape[0]
            result = {
                "probabilities": np.full((batch, 10), 0.1, np.float32),
                "label": np.arange(batch, dtype=np.int64),
            }
        return {name: value for name, value in result.items() if outputs is None or name in outputs}

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo("add_sub", "onnxruntime_onnx", [VersionInfo(1, "READY")]),
            ModelInfo(
                "digits",
                "onnxruntime_onnx",
                [VersionInfo(1, "READY"), VersionInfo(2, "FAILED", "2/model.onnx: not an ONNX file")],
            ),
            ModelInfo("broken", "", [], "config.pbtxt: unknown field 'foo'"),
        ]

    def health(self, service: str = "") -> str:
        self.calls.append(("health", service))
        if service == "nope":
            raise NotFoundError(grpc.StatusCode.NOT_FOUND, "unknown service 'nope'")
        return self.health_status


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    FakeClient.instances = []
    FakeClient.health_status = "SERVING"
    monkeypatch.setattr(cli, "Client", FakeClient)
    return FakeClient


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# Parsing ----------------------------------------------------------------------------------------------------


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["--help"], capsys)

    assert status == 0
    for command in ("serve", "predict", "models", "metadata", "health"):
        assert command in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run([], capsys)

    assert status == 2
    assert "usage: tensorgate" in err


def test_predict_arguments() -> None:
    args = cli.build_parser().parse_args(
        ["predict", "digits", "-i", "image=x.npy", "--version", "2", "-o", "label", "--timeout", "1.5"]
    )

    assert args.model == "digits"
    assert args.inputs == [("image", Path("x.npy"))]
    assert args.version == 2
    assert args.outputs == ["label"]
    assert args.timeout == 1.5
    assert args.json_file is None


def test_address_default_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENSORGATE_ADDRESS", raising=False)
    assert cli.build_parser().parse_args(["models"]).address == "127.0.0.1:8001"

    monkeypatch.setenv("TENSORGATE_ADDRESS", "10.0.0.1:9000")
    assert cli.build_parser().parse_args(["models"]).address == "10.0.0.1:9000"
    assert cli.build_parser().parse_args(["models", "--address", "h:1"]).address == "h:1"


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "digits"],  # no inputs
        ["predict", "digits", "-i", "image=x.npy", "--json", "x.json"],  # both sources
        ["predict", "digits", "-i", "image"],  # no =FILE
        ["predict", "digits", "-i", "=x.npy"],
        ["predict", "digits", "-i", "image=x.npy", "--version", "0"],
        ["metadata", "digits", "--version", "latest"],
        ["models", "--timeout", "-1"],
        ["nonsense"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str], fake: type[FakeClient]) -> None:
    status, _, err = run(argv, capsys)

    assert status == 2
    assert "usage:" in err
    assert fake.instances == []


# Local input ------------------------------------------------------------------------------------------------


def test_npy_inputs(tmp_path: Path) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.save(tmp_path / "a.npy", a)

    inputs = cli.npy_inputs([("a", tmp_path / "a.npy")])

    np.testing.assert_array_equal(inputs["a"], a)
    assert inputs["a"].dtype == np.float32


def test_npy_missing_file(tmp_path: Path) -> None:
    with pytest.raises(cli.InputError, match=r"cannot read input 'a' from .*missing\.npy"):
        cli.npy_inputs([("a", tmp_path / "missing.npy")])


def test_npy_refuses_pickles_and_archives(tmp_path: Path) -> None:
    np.save(tmp_path / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "two.npz", a=np.zeros(1), b=np.ones(1))

    with pytest.raises(cli.InputError, match="cannot read input"):
        cli.npy_inputs([("a", tmp_path / "objects.npy")])
    with pytest.raises(cli.InputError, match="several arrays"):
        cli.npy_inputs([("a", tmp_path / "two.npz")])


def test_npy_duplicate_name(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros(1))

    with pytest.raises(cli.InputError, match="given twice"):
        cli.npy_inputs([("a", tmp_path / "a.npy"), ("a", tmp_path / "a.npy")])


def never() -> dict[str, str]:
    raise AssertionError("metadata must not be asked for")


def test_json_plain_lists_take_the_model_dtype() -> None:
    asked: list[int] = []

    def dtypes() -> dict[str, str]:
        asked.append(1)
        return {"a": "FP32", "b": "INT64"}

    inputs = cli.json_inputs('{"a": [[1, 2, 3, 4]], "b": [[1, 2]]}', dtypes)

    assert asked == [1]  # once, however many inputs need it
    assert inputs["a"].dtype == np.float32
    assert inputs["a"].shape == (1, 4)
    assert inputs["b"].dtype == np.int64


def test_json_explicit_dtype_and_shape() -> None:
    inputs = cli.json_inputs(
        json.dumps(
            {
                "x": {"dtype": "FP16", "data": [1, 2, 3, 4, 5, 6], "shape": [2, 3]},
                "s": {"dtype": "BYTES", "data": ["hello", "wörld"]},
                "k": {"dtype": "BOOL", "data": [True, False]},
            }
        ),
        never,
    )

    assert inputs["x"].dtype == np.float16
    assert inputs["x"].shape == (2, 3)
    assert inputs["s"].dtype == np.object_
    assert list(inputs["s"]) == ["hello", "wörld"]
    assert inputs["k"].dtype == np.bool_


def test_json_object_without_dtype_uses_metadata() -> None:
    inputs = cli.json_inputs('{"a": {"data": [1, 2, 3, 4], "shape": [1, 4]}}', lambda: {"a": "INT32"})

    assert inputs["a"].dtype == np.int32
    assert inputs["a"].shape == (1, 4)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "bad JSON"),
        ("[1, 2]", "must be an object"),
        ("{}", "must be an object"),
        ('{"a": {"dtype": "FP32"}}', "expected the keys"),
        ('{"a": {"dtype": "FP32", "data": [1], "colour": "red"}}', "expected the keys"),
        ('{"a": {"dtype": "FP128", "data": [1]}}', "unknown data type 'FP128'"),
        ('{"a": {"dtype": 12, "data": [1]}}', '"dtype" must be a string'),
        ('{"a": {"dtype": "FP32", "data": [[1, 2], [3]]}}', "cannot make a FP32 array"),
        ('{"a": {"dtype": "FP32", "data": ["one"]}}', "needs numbers, not strings"),
        ('{"a": {"dtype": "INT64", "data": [1.5]}}', "needs whole numbers"),
        ('{"a": {"dtype": "UINT8", "data": [300]}}', "cannot make a UINT8 array"),
        ('{"a": {"dtype": "FP32", "data": [1, 2, 3], "shape": [2, 2]}}', "cannot make a FP32 array"),
        ('{"a": {"dtype": "FP32", "data": [1, 2], "shape": "2"}}', '"shape" must be a list'),
    ],
)
def test_json_bad_input(text: str, message: str) -> None:
    with pytest.raises(cli.InputError, match=message):
        cli.json_inputs(text, never)


def test_json_unknown_input_name() -> None:
    with pytest.raises(cli.InputError, match=r"no input 'x' \(its inputs: a, b\)"):
        cli.json_inputs('{"x": [1]}', lambda: {"a": "FP32", "b": "FP32"})


# Output -----------------------------------------------------------------------------------------------------


def test_format_outputs_summarises() -> None:
    text = cli.format_outputs({"big": np.zeros((100, 100), np.float32), "label": np.array([3, 7], np.int64)})

    assert "big: FP32 [100, 100]" in text
    assert "..." in text
    assert len(text.splitlines()) < 30
    assert "label: INT64 [2]\n  [3, 7]" in text


def test_save_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs: dict[str, npt.NDArray[Any]] = {
        "sum": np.ones((1, 4), np.float32),
        "../escape": np.zeros(1, np.int8),
        "names": np.array([b"a", b"bc"], dtype=object),
    }

    cli.save_outputs(outputs, tmp_path / "out")

    np.testing.assert_array_equal(np.load(tmp_path / "out" / "sum.npy"), outputs["sum"])
    assert (tmp_path / "out" / "_escape.npy").exists()
    assert list(np.load(tmp_path / "out" / "names.npy")) == [b"a", b"bc"]
    assert "sum: FP32 [1, 4] ->" in capsys.readouterr().out


def test_format_models() -> None:
    lines = cli.format_models(FakeClient("x").models()).splitlines()

    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "PLATFORM", "REASON"]
    assert lines[1].split() == ["add_sub", "1", "READY", "onnxruntime_onnx"]
    assert lines[3].split()[:4] == ["digits", "2", "FAILED", "onnxruntime_onnx"]
    assert lines[3].endswith("2/model.onnx: not an ONNX file")
    assert lines[4].startswith("broken")
    assert lines[4].endswith("config.pbtxt: unknown field 'foo'")


def test_format_metadata() -> None:
    text = cli.format_metadata(DIGITS)

    assert "model:          digits" in text
    assert "max batch size: 64" in text
    assert "image  FP32  [-1, 1, 8, 8]" in text
    assert "label          INT64  [-1]" in text


# Commands (fake client) -------------------------------------------------------------------------------------


def test_predict_json_prints_outputs(
    capsys: pytest.CaptureFixture[str], fake: type[FakeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"a": [[1, 2, 3, 4]], "b": [[4, 3, 2, 1]]}'))

    status, out, err = run(["predict", "add_sub", "--json", "-", "--address", "h:1", "--timeout", "3"], capsys)

    assert (status, err) == (0, "")
    assert "sum: FP32 [1, 4]\n  [[5., 5., 5., 5.]]" in out
    assert "difference: FP32 [1, 4]" in out
    client = fake.instances[0]
    assert client.address == "h:1"
    assert client.kwargs["timeout"] == 3.0
    assert client.closed
    assert [name for name, _ in client.calls] == ["metadata", "predict"]


def test_predict_npy_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: type[FakeClient]) -> None:
    np.save(tmp_path / "image.npy", np.zeros((3, 1, 8, 8), np.float32))

    status, out, _ = run(
        [
            "predict",
            "digits",
            "-i",
            f"image={tmp_path / 'image.npy'}",
            "-o",
            "label",
            "--save",
            str(tmp_path),
        ],
        capsys,
    )

    assert status == 0
    np.testing.assert_array_equal(np.load(tmp_path / "label.npy"), [0, 1, 2])
    assert not (tmp_path / "probabilities.npy").exists()
    assert "label: INT64 [3] ->" in out
    assert [name for name, _ in fake.instances[0].calls] == ["predict"]  # .npy carries its dtype


def test_predict_missing_file_exits_2_without_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: type[FakeClient]
) -> None:
    status, out, err = run(["predict", "digits", "--json", str(tmp_path / "nope.json")], capsys)

    assert status == 2
    assert out == ""
    assert err.startswith("error: cannot read ")
    assert fake.instances == []


def test_predict_bad_json_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: type[FakeClient]) -> None:
    (tmp_path / "in.json").write_text('{"image": [[1, 2], [3]]}')

    status, _, err = run(["predict", "digits", "--json", str(tmp_path / "in.json")], capsys)

    assert status == 2
    assert err.startswith("error: input 'image': cannot make a FP32 array")


def test_server_error_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str], fake: type[FakeClient]) -> None:
    (tmp_path / "in.json").write_text('{"x": {"dtype": "FP32", "data": [1]}}')

    status, out, err = run(["predict", "nope", "--json", str(tmp_path / "in.json")], capsys)

    assert status == 1
    assert out == ""
    assert err == "error: NOT_FOUND: model 'nope' is not in the repository\n"


def test_metadata_of_unknown_model_exits_1(capsys: pytest.CaptureFixture[str], fake: type[FakeClient]) -> None:
    status, _, err = run(["metadata", "nope"], capsys)

    assert status == 1
    assert err.startswith("error: NOT_FOUND: ")


def test_models_command(capsys: pytest.CaptureFixture[str], fake: type[FakeClient]) -> None:
    status, out, _ = run(["models"], capsys)

    assert status == 0
    assert out.splitlines()[0].startswith("MODEL")


@pytest.mark.parametrize(("health", "expected"), [("SERVING", 0), ("NOT_SERVING", 1), ("UNKNOWN", 1)])
def test_health_exit_status(
    health: str, expected: int, capsys: pytest.CaptureFixture[str], fake: type[FakeClient]
) -> None:
    fake.health_status = health

    status, out, _ = run(["health", "digits"], capsys)

    assert status == expected
    assert out == f"{health}\n"
    assert fake.instances[0].calls == [("health", "digits")]


def test_health_of_unknown_service(capsys: pytest.CaptureFixture[str], fake: type[FakeClient]) -> None:
    status, _, err = run(["health", "nope"], capsys)

    assert status == 1
    assert err == "error: NOT_FOUND: unknown service 'nope'\n"


def test_missing_certificate_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    status, _, err = run(["models", "--tls-ca", str(tmp_path / "ca.pem")], capsys)

    assert status == 2
    assert "ca.pem" in err


# serve ------------------------------------------------------------------------------------------------------


def test_serve_hands_every_argument_to_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []

    def serve_main(argv: list[str]) -> int:
        received.append(list(argv))
        return 7

    server_cli = types.ModuleType("tensorgate.server.cli")
    server_cli.main = serve_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorgate.server.cli", server_cli)

    assert cli.main(["serve", "--help", "--address", "0.0.0.0:1", "predict"]) == 7
    assert received == [["--help", "--address", "0.0.0.0:1", "predict"]]


def test_serve_without_the_server(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tensorgate.server.cli", None)

    status, _, err = run(["serve"], capsys)

    assert status == 2
    assert err == "error: the server is not installed: pip install tensorgate\n"
