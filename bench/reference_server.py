"""A bare grpc.aio Predict server: the floor tensorgate's per-request overhead is measured against.

It serves one ONNX model under `/tensorgate.v1.Predict/Predict` with none of tensorgate's work: no batching,
no validation, no routing, no tracing, no metrics. It decodes the first input's raw bytes with `np.frombuffer`,
runs the session, and encodes every output. A request it cannot handle fails however Python fails.

Two handler modes, chosen by `--mode`:
- `inline` (the default) runs `session.run` on the event loop thread. For a model as small as the benchmark MLP
  (tens of microseconds per call) this is the fastest honest bare server: no thread hop, no future, no wake-up.
  It blocks the loop during compute, which is exactly why a real server cannot do it for big models.
- `executor` runs it on a one-thread executor, the shape tensorgate's ONNX Runtime engine uses.

`python -m bench.reference_server --model M.onnx` prints `reference listening on HOST:PORT` once the port is
bound (the same line shape as `tensorgate serve`), and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from bench.inprocess import load_session
from tensorgate.v1 import predict_pb2, tensor_pb2

__all__ = ["make_handler", "serve"]

_METHOD_SERVICE = "tensorgate.v1.Predict"
_METHOD_NAME = "Predict"

# Only what the benchmark models use; anything else is out of scope for a bare server.
_WIRE_TO_NUMPY: dict[int, type[np.generic]] = {
    tensor_pb2.DATA_TYPE_FP32: np.float32,
    tensor_pb2.DATA_TYPE_FP64: np.float64,
    tensor_pb2.DATA_TYPE_INT64: np.int64,
    tensor_pb2.DATA_TYPE_INT32: np.int32,
    tensor_pb2.DATA_TYPE_UINT8: np.uint8,
}
_NUMPY_TO_WIRE: dict[np.dtype[Any], tensor_pb2.DataType.ValueType] = {
    np.dtype(np.float32): tensor_pb2.DATA_TYPE_FP32,
    np.dtype(np.float64): tensor_pb2.DATA_TYPE_FP64,
    np.dtype(np.int64): tensor_pb2.DATA_TYPE_INT64,
    np.dtype(np.int32): tensor_pb2.DATA_TYPE_INT32,
    np.dtype(np.uint8): tensor_pb2.DATA_TYPE_UINT8,
}

Handler = Callable[[predict_pb2.PredictRequest, grpc.aio.ServicerContext[Any, Any]], Any]


def make_handler(session: ort.InferenceSession, mode: str) -> Handler:
    """The Predict coroutine for `session`, computing inline on the loop or on a one-thread executor."""
    input_name = session.get_inputs()[0].name
    output_names = [out.name for out in session.get_outputs()]

    def compute(request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        tensor = request.inputs[0]
        array = np.frombuffer(tensor.raw, dtype=_WIRE_TO_NUMPY[tensor.dtype]).reshape(tuple(tensor.shape))
        results: list[npt.NDArray[Any]] = session.run(output_names, {input_name: array})
        return predict_pb2.PredictResponse(
            model=request.model,
            version=1,
            outputs=[
                tensor_pb2.Tensor(name=name, dtype=_NUMPY_TO_WIRE[value.dtype], shape=value.shape, raw=value.tobytes())
                for name, value in zip(output_names, results, strict=True)
            ],
            request_id=request.request_id,
        )

    if mode == "inline":

        async def predict_inline(
            request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
        ) -> predict_pb2.PredictResponse:
            return compute(request)

        return predict_inline
    if mode == "executor":
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-ort")

        async def predict_executor(
            request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
        ) -> predict_pb2.PredictResponse:
            return await asyncio.get_running_loop().run_in_executor(executor, compute, request)

        return predict_executor
    raise ValueError(f"unknown mode {mode!r}; use 'inline' or 'executor'")


async def serve(model_file: Path, address: str, mode: str) -> None:
    """Serve until SIGTERM/SIGINT, printing the bound address once the port is open."""
    session = load_session(model_file)
    handler = make_handler(session, mode)
    server = grpc.aio.server()
    method = grpc.unary_unary_rpc_method_handler(
        handler,
        request_deserializer=predict_pb2.PredictRequest.FromString,
        response_serializer=predict_pb2.PredictResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_METHOD_SERVICE, {_METHOD_NAME: method}),))
    host = address.rsplit(":", 1)[0]
    port = server.add_insecure_port(address)
    await server.start()
    print(f"reference listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="bare grpc.aio Predict server (benchmark reference)")
    parser.add_argument("--model", type=Path, required=True, help="the .onnx file to serve")
    parser.add_argument("--address", default="127.0.0.1:0", help="host:port; port 0 picks a free one")
    parser.add_argument("--mode", choices=("inline", "executor"), default="inline")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.model, args.address, args.mode))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
