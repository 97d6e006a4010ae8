"""The protocol-neutral request path: route, check, queue in the batcher, pick the outputs.

API adapters decode their protobuf into an `InferenceRequest`, call `InferenceService.infer`, and encode the
`InferenceResult`; nothing here knows about gRPC.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy.typing as npt

from tensorgate.server.batching import RequestTimes
from tensorgate.server.errors import TensorgateError
from tensorgate.server.repository import ModelVersion, Repository

__all__ = ["InferenceProbe", "InferenceRequest", "InferenceResult", "InferenceService"]


@dataclass(slots=True)
class InferenceRequest:
    """One decoded request."""

    model: str
    inputs: dict[str, npt.NDArray[Any]]
    request_id: str
    #: None (or 0) lets the repository choose the version.
    version: int | None = None
    #: None means every output.
    outputs: tuple[str, ...] | None = None
    #: Absolute, on time.monotonic(); None when the caller set no deadline.
    deadline: float | None = None
    #: 1 is the highest; 0 takes the model's default level.
    priority: int = 0
    #: Filled in with the request's queue and batch times once it has run, when given.
    times: RequestTimes | None = None


@dataclass(slots=True)
class InferenceResult:
    """The outputs of one request, and which version produced them."""

    model: str
    version: int
    outputs: dict[str, npt.NDArray[Any]]


class InferenceProbe(Protocol):
    """Telemetry around each request (`tensorgate.server.telemetry`): it calls `route` and `run` itself."""

    async def infer(self, service: InferenceService, request: InferenceRequest) -> InferenceResult: ...


class InferenceService:
    """Runs requests against the models of one repository; `probe`, when given, observes every request."""

    def __init__(self, repository: Repository, probe: InferenceProbe | None = None) -> None:
        self.repository = repository
        self._probe = probe

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        """Route, check and run one request through its model's batcher.

        Raises the server's errors: ModelNotFoundError, InvalidInputError (naming the tensor),
        ResourceExhaustedError, DeadlineExceededError, UnavailableError, EngineFailedError.
        """
        if self._probe is not None:
            return await self._probe.infer(self, request)
        return await self.run(self.route(request), request)

    def route(self, request: InferenceRequest) -> ModelVersion:
        """The `route` stage: the ready model version the request goes to."""
        return self.repository.resolve(request.model, request.version)

    async def run(self, target: ModelVersion, request: InferenceRequest, *, tag: object = None) -> InferenceResult:
        """Check and run a routed request through `target`'s batcher; `tag` goes to the batch (`current_batch`)."""
        signature, batcher = target.signature, target.batcher
        # A ready version always has both; the check keeps the types honest.
        assert signature is not None
        assert batcher is not None
        statistics = target.statistics
        started = time.perf_counter_ns()
        try:
            signature.check_request(request.inputs, request.outputs)
            outputs = await batcher.submit(
                request.inputs,
                deadline=request.deadline,
                priority=request.priority,
                request_id=request.request_id,
                tag=tag,
                times=request.times,
            )
        except TensorgateError:
            statistics.request_failed(time.perf_counter_ns() - started)
            raise
        statistics.request_succeeded(time.perf_counter_ns() - started)
        if request.outputs:
            outputs = {name: outputs[name] for name in request.outputs}
        return InferenceResult(target.name, target.version, outputs)
