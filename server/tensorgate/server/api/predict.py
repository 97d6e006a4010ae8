"""`tensorgate.v1.Predict`: protobuf in, the core's request path, protobuf out."""

from __future__ import annotations

from typing import Any

import grpc

from tensorgate.server.api.codec import (
    RequestIds,
    deadline_from,
    decode_inputs,
    encode_outputs,
    requested_outputs,
)
from tensorgate.server.inference import InferenceRequest, InferenceService
from tensorgate.server.repository.routing import routing_hints
from tensorgate.v1 import predict_pb2, predict_pb2_grpc

__all__ = ["PredictServicer"]


class PredictServicer(predict_pb2_grpc.PredictServicer):
    """Unary inference."""

    def __init__(self, service: InferenceService, request_ids: RequestIds) -> None:
        self._service = service
        self._request_ids = request_ids

    async def Predict(  # noqa: N802 (the gRPC method's name)
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> predict_pb2.PredictResponse:
        """Run one request through the model's batcher."""
        request_id = request.request_id or self._request_ids.new()
        self._service.limits.check_elements(request.inputs)  # before decoding: a huge shape costs nothing
        result = await self._service.infer(
            InferenceRequest(
                model=request.model,
                version=request.version or None,
                inputs=decode_inputs(request.inputs),
                outputs=requested_outputs(request.outputs),
                request_id=request_id,
                deadline=deadline_from(context),
                priority=request.priority,
                routing=routing_hints(context.invocation_metadata()),
            )
        )
        return predict_pb2.PredictResponse(
            model=result.model,
            version=result.version,
            outputs=encode_outputs(result.outputs),
            request_id=request_id,
        )
