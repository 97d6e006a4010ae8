"""Drives a tensorgate server with tritonclient's gRPC clients and records what came back.

Run by tests/integration/test_oip_tritonclient.py in a separate interpreter (the tritonclient venv): tritonclient
registers the protobuf symbols `inference.*`, as our own stubs do, so the two cannot share a process (FACTS.md).
It imports nothing from tensorgate. Usage:

    python oip_driver.py PLAN.json

PLAN.json names the server address, an `.npz` of input arrays, our serialized FileDescriptorSet (to compare
with tritonclient's compiled contract), the models to exercise, and where to write `results.json` and
`outputs.npz`. Every check is recorded, never asserted here: the test decides. One run does everything, so the
interpreter starts once.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

Json = dict[str, Any]
TIMEOUT_S = 60.0

#: numpy dtypes to send per datatype, for the identity models (tritonclient wants ml_dtypes for BF16).
NUMPY: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


# -- the contract --------------------------------------------------------------------------------------------


def _fields(message: descriptor_pb2.DescriptorProto, prefix: str, into: dict[str, tuple[Any, ...]]) -> None:
    for nested in message.nested_type:
        _fields(nested, f"{prefix}.{nested.name}", into)
    for enum in message.enum_type:
        for value in enum.value:
            into[f"{prefix}.{enum.name}.{value.name}"] = ("enum value", value.number)
    into[prefix] = ("message", tuple(sorted(oneof.name for oneof in message.oneof_decl)))
    for field in message.field:
        oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else ""
        into[f"{prefix}.{field.name}"] = ("field", field.number, field.type, field.label, field.type_name, oneof)


def _symbols(files: list[descriptor_pb2.FileDescriptorProto]) -> dict[str, tuple[Any, ...]]:
    symbols: dict[str, tuple[Any, ...]] = {}
    for file in files:
        for message in file.message_type:
            _fields(message, f"{file.package}.{message.name}", symbols)
        for enum in file.enum_type:
            for value in enum.value:
                symbols[f"{file.package}.{enum.name}.{value.name}"] = ("enum value", value.number)
        for service in file.service:
            for method in service.method:
                symbols[f"{file.package}.{service.name}/{method.name}"] = (
                    "method",
                    method.input_type,
                    method.output_type,
                    method.client_streaming,
                    method.server_streaming,
                )
    return symbols


def check_contract(ours_path: Path) -> Json:
    """Every message, field, enum value and method of ours must exist in tritonclient's contract, identical in
    number, type, label, type name and oneof; and every message of the service file must have all of Triton's
    fields (the model config file is a declared subset)."""
    ours_set = descriptor_pb2.FileDescriptorSet.FromString(ours_path.read_bytes())
    theirs_files = []
    for module in (service_pb2, model_config_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        theirs_files.append(proto)
    ours, theirs = _symbols(list(ours_set.file)), _symbols(theirs_files)
    problems = [
        f"{name}: ours {ours[name]} vs Triton's {theirs.get(name, 'missing')}"
        for name in sorted(ours)
        if theirs.get(name) != ours[name]
    ]
    service_messages = {
        f"inference.{message.name}"
        for file in ours_set.file
        if file.name.endswith("grpc_service.proto")
        for message in file.message_type
    }
    problems += [
        f"{name}: Triton has it, ours lacks it"
        for name, value in sorted(theirs.items())
        if value[0] == "field" and name.rsplit(".", 1)[0] in service_messages and name not in ours
    ]
    return {"checked": len(ours), "problems": problems}


# -- helpers -------------------------------------------------------------------------------------------------


def _error(exc: InferenceServerException) -> Json:
    return {"status": str(exc.status()), "message": exc.message()}


def _attempt(call: Callable[[], Any]) -> Json:
    try:
        value = call()
    except InferenceServerException as exc:
        return {"error": _error(exc)}
    return {"value": value}


def _inputs(arrays: dict[str, np.ndarray[Any, Any]], datatypes: dict[str, str]) -> list[Any]:
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), datatypes[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _save(outputs: dict[str, np.ndarray[Any, Any]], key: str, array: np.ndarray[Any, Any]) -> None:
    # npz without pickle: BYTES as fixed-width bytes, BF16 as its 16-bit pattern.
    if array.dtype == np.object_:
        array = array.astype(np.bytes_)
    elif array.dtype == ml_dtypes.bfloat16:
        array = array.view(np.uint16)
    outputs[key] = np.ascontiguousarray(array)


# -- the run -------------------------------------------------------------------------------------------------


def run(plan: Json) -> tuple[Json, dict[str, np.ndarray[Any, Any]]]:
    address: str = plan["address"]
    given = dict(np.load(plan["inputs"], allow_pickle=False))
    results: Json = {"contract": check_contract(Path(plan["descriptors"]))}
    outputs: dict[str, np.ndarray[Any, Any]] = {}
    client = grpcclient.InferenceServerClient(address)

    # Health and metadata.
    results["server_live"] = client.is_server_live()
    results["server_ready"] = client.is_server_ready()
    results["model_ready"] = {
        "digits": client.is_model_ready("digits"),
        "digits/1": client.is_model_ready("digits", "1"),
        "digits/7": client.is_model_ready("digits", "7"),
        "nope": client.is_model_ready("nope"),
    }
    results["server_metadata"] = client.get_server_metadata(as_json=True)
    results["model_metadata"] = {name: client.get_model_metadata(name, as_json=True) for name in plan["models"]}
    results["model_config"] = {
        name: client.get_model_config(name, as_json=True)["config"] for name in ("digits", "add_sub")
    }
    results["statistics_before"] = client.get_inference_statistics("add_sub", as_json=True)

    # Sync infer: digits, all outputs and then chosen ones with a classification.
    image = given["image"]
    result = client.infer("digits", _inputs({"image": image}, {"image": "FP32"}), request_id="sync-1")
    results["sync_id"] = result.get_response().id
    _save(outputs, "sync/probabilities", result.as_numpy("probabilities"))
    _save(outputs, "sync/label", result.as_numpy("label"))
    requested = [grpcclient.InferRequestedOutput("probabilities", class_count=3)]
    result = client.infer("digits", _inputs({"image": image}, {"image": "FP32"}), outputs=requested)
    results["classification_outputs"] = [tensor.name for tensor in result.get_response().outputs]
    _save(outputs, "sync/classification", result.as_numpy("probabilities"))
    result = client.infer(
        "digits", _inputs({"image": image}, {"image": "FP32"}), model_version="1", priority=1, timeout=30_000_000
    )
    _save(outputs, "sync/with_parameters", result.as_numpy("label"))

    # async_infer with a callback.
    a, b = given["a"], given["b"]
    add_inputs = _inputs({"a": a, "b": b}, {"a": "FP32", "b": "FP32"})
    done = threading.Event()
    received: list[Any] = []

    def callback(result: Any, error: Any) -> None:
        received.append((result, error))
        done.set()

    client.async_infer("add_sub", add_inputs, callback, request_id="async-1")
    done.wait(TIMEOUT_S)
    async_result, async_error = received[0] if received else (None, "no callback")
    results["async_error"] = None if async_error is None else str(async_error)
    if async_result is not None:
        results["async_id"] = async_result.get_response().id
        _save(outputs, "async/sum", async_result.as_numpy("sum"))
        _save(outputs, "async/difference", async_result.as_numpy("difference"))

    # The asyncio client.
    async def with_asyncio() -> None:
        async with aioclient.InferenceServerClient(address) as aclient:
            results["aio_ready"] = await aclient.is_model_ready("add_sub")
            aio_inputs = []
            for name, array in (("a", a), ("b", b)):
                tensor = aioclient.InferInput(name, list(array.shape), "FP32")
                tensor.set_data_from_numpy(array)
                aio_inputs.append(tensor)
            result = await aclient.infer("add_sub", aio_inputs, request_id="aio-1")
            results["aio_id"] = result.get_response().id
            _save(outputs, "aio/sum", result.as_numpy("sum"))
            metadata = await aclient.get_model_metadata("add_sub", as_json=True)
            results["aio_metadata_name"] = metadata["name"]

    asyncio.run(with_asyncio())

    # A stream: good, bad (wrong shape), unknown model, good; every request gets its answer, in order.
    stream_results: list[Json] = []
    stream_done = threading.Event()

    def on_stream(result: Any, error: Any) -> None:
        if error is not None:
            stream_results.append({"error": str(error)})
        else:
            response = result.get_response()
            stream_results.append({"id": response.id, "sum": result.as_numpy("sum").tolist()})
        if len(stream_results) == 4:
            stream_done.set()

    client.start_stream(callback=on_stream)
    try:
        client.async_stream_infer("add_sub", add_inputs, request_id="s-1")
        client.async_stream_infer("add_sub", _inputs({"a": a[:, :2], "b": b[:, :2]}, {"a": "FP32", "b": "FP32"}))
        client.async_stream_infer("nope", add_inputs, request_id="s-3")
        client.async_stream_infer("add_sub", _inputs({"a": b, "b": a}, {"a": "FP32", "b": "FP32"}), request_id="s-4")
        stream_done.wait(TIMEOUT_S)
    finally:
        client.stop_stream()
    results["stream"] = stream_results

    # Every datatype, through identity models (tritonclient always sends raw_input_contents).
    identity: Json = {}
    for datatype in plan["datatypes"]:
        array = given[f"identity/{datatype}"]
        if datatype == "BYTES":
            array = array.astype(np.object_)
        elif datatype == "BF16":
            array = array.view(ml_dtypes.bfloat16)

        def call(array: np.ndarray[Any, Any] = array, datatype: str = datatype) -> Any:
            return client.infer(f"identity_{datatype.lower()}", _inputs({"x": array}, {"x": datatype}))

        attempt = _attempt(call)
        if "error" in attempt:
            identity[datatype] = attempt
            continue
        response = attempt["value"]
        identity[datatype] = {"datatype": response.get_response().outputs[0].datatype}
        _save(outputs, f"identity/{datatype}", response.as_numpy("y"))
    results["identity"] = identity

    # Errors: the status code and the message, as tritonclient reports them.
    f64 = image.astype(np.float64)
    results["errors"] = {
        "unknown_model": _attempt(lambda: client.infer("nope", _inputs({"image": image}, {"image": "FP32"}))),
        "unknown_version": _attempt(
            lambda: client.infer("digits", _inputs({"image": image}, {"image": "FP32"}), model_version="7")
        ),
        "wrong_dtype": _attempt(lambda: client.infer("digits", _inputs({"image": f64}, {"image": "FP64"}))),
        "wrong_shape": _attempt(lambda: client.infer("digits", _inputs({"image": image[:, 0]}, {"image": "FP32"}))),
        "bad_priority": _attempt(
            lambda: client.infer("digits", _inputs({"image": image}, {"image": "FP32"}), priority=9)
        ),
        "metadata_unknown": _attempt(lambda: client.get_model_metadata("nope")),
    }
    for value in results["errors"].values():
        value.pop("value", None)

    # Statistics after the traffic above; the repository index.
    results["statistics_after"] = client.get_inference_statistics("add_sub", as_json=True)
    results["statistics_all"] = client.get_inference_statistics(as_json=True)
    results["index"] = client.get_model_repository_index(as_json=True)

    # Unload and load again; load a model directory that appeared after the server started.
    lifecycle: Json = {}
    client.unload_model("add_sub")
    lifecycle["ready_after_unload"] = client.is_model_ready("add_sub")
    lifecycle["infer_after_unload"] = _attempt(lambda: client.infer("add_sub", add_inputs))
    lifecycle["infer_after_unload"].pop("value", None)
    lifecycle["index_after_unload"] = client.get_model_repository_index(as_json=True)
    client.load_model("add_sub")
    lifecycle["ready_after_load"] = client.is_model_ready("add_sub")
    _save(outputs, "reloaded/sum", client.infer("add_sub", add_inputs).as_numpy("sum"))
    late: str = plan["late_model"]
    lifecycle["late_ready_before"] = client.is_model_ready(late)
    client.load_model(late)
    lifecycle["late_ready_after"] = client.is_model_ready(late)
    _save(outputs, "late/sum", client.infer(late, add_inputs).as_numpy("sum"))
    lifecycle["load_missing"] = _attempt(lambda: client.load_model("no_such_dir"))
    lifecycle["unload_missing"] = _attempt(lambda: client.unload_model("no_such_model"))
    for key in ("load_missing", "unload_missing"):
        lifecycle[key].pop("value", None)
    results["lifecycle"] = lifecycle
    client.close()
    return results, outputs


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    results, outputs = run(plan)
    out = Path(plan["out"])
    arrays: dict[str, Any] = outputs
    np.savez(out / "outputs.npz", **arrays)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
