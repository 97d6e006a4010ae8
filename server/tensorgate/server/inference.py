"""The protocol-neutral request path: route, check, queue in the batcher, pick the outputs.

API adapters decode their protobuf into an `InferenceRequest`, call `InferenceService.infer`, and encode the
`InferenceResult`; nothing here knows about gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from tensorgate.server.repository import Repository

__all__ = ["InferenceRequest", "InferenceResult", "InferenceService"]


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


@dataclass(slots=True)
class InferenceResult:
    """The outputs of one request, and which version produced them."""

    model: str
    version: int
    outputs: dict[str, npt.NDArray[Any]]


class InferenceService:
    """Runs requests against the models of one repository."""

    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        """Route, check and run one request through its model's batcher.

        Raises the server's errors: ModelNotFoundError, InvalidInputError (naming the tensor),
        ResourceExhaustedError, DeadlineExceededError, UnavailableError, EngineFailedError.
        """
        target = self.repository.resolve(request.model, request.version)
        signature, batcher = target.signature, target.batcher
        # A ready version always has both; the check keeps the types honest.
        assert signature is not None
        assert batcher is not None
        signature.check_request(request.inputs, request.outputs)
        outputs = await batcher.submit(
            request.inputs,
            deadline=request.deadline,
            priority=request.priority,
            request_id=request.request_id,
        )
        if request.outputs:
            outputs = {name: outputs[name] for name in request.outputs}
        return InferenceResult(target.name, target.version, outputs)
