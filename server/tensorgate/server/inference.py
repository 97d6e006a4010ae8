"""The protocol-neutral request path: route, check, queue in the batcher, pick the outputs.

API adapters decode their protobuf into an `InferenceRequest`, call `InferenceService.infer`, and encode the
`InferenceResult`; nothing here knows about gRPC. On the way, the server's per-request limits (`limits`) and each
version's circuit breaker (`breakers`: a version whose engine keeps failing is taken out of rotation) apply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy.typing as npt

from tensorgate.server.batching import RequestTimes
from tensorgate.server.errors import EngineFailedError, TensorgateError
from tensorgate.server.overload import Breakers, Limits
from tensorgate.server.repository import ModelVersion, Repository
from tensorgate.server.repository.routing import RoutingHints

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
    #: The call's metadata, for version pins and weighted routing (`repository.routing`); None: no headers.
    routing: RoutingHints | None = None


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
    """Runs requests against the models of one repository; `probe`, when given, observes every request.

    `limits` are the per-request limits (the adapters read them too, to check tensors before decoding them);
    `breakers`, when given, keep a circuit breaker per model version.
    """

    def __init__(
        self,
        repository: Repository,
        probe: InferenceProbe | None = None,
        *,
        limits: Limits | None = None,
        breakers: Breakers | None = None,
    ) -> None:
        self.repository = repository
        self._probe = probe
        self.limits = limits if limits is not None else Limits()
        self.breakers = breakers

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        """Route, check and run one request through its model's batcher.

        Raises the server's errors: ModelNotFoundError, InvalidInputError (naming the tensor),
        ResourceExhaustedError, DeadlineExceededError, UnavailableError (also while the version's breaker is
        open), EngineFailedError.
        """
        if self._probe is not None:
            return await self._probe.infer(self, request)
        return await self.run(self.route(request), request)

    def route(self, request: InferenceRequest) -> ModelVersion:
        """The `route` stage: the ready model version the request goes to."""
        in_rotation = self.breakers.in_rotation if self.breakers is not None else None
        return self.repository.resolve(request.model, request.version, request.routing, in_rotation)

    async def run(self, target: ModelVersion, request: InferenceRequest, *, tag: object = None) -> InferenceResult:
        """Check and run a routed request through `target`'s batcher; `tag` goes to the batch (`current_batch`)."""
        if not target.ready:  # it started retiring (a reload) after the request was routed: route it again, once
            target = self.route(request)
        signature, batcher = target.signature, target.batcher
        # A ready version always has both; the check keeps the types honest.
        assert signature is not None
        assert batcher is not None
        statistics = target.statistics
        breaker = self.breakers.breaker(target) if self.breakers is not None else None
        ticket = None
        started = time.perf_counter_ns()
        try:
            signature.check_request(request.inputs, request.outputs)
            self.limits.check_rows(signature.max_batch_size, request.inputs)
            # After the checks: a request that cannot run must not take a half-open breaker's one trial.
            if breaker is not None:
                ticket = breaker.admit()
            outputs = await batcher.submit(
                request.inputs,
                deadline=request.deadline,
                priority=request.priority,
                request_id=request.request_id,
                tag=tag,
                times=request.times,
            )
        except TensorgateError as exc:
            statistics.request_failed(time.perf_counter_ns() - started)
            if breaker is not None and ticket is not None:
                if isinstance(exc, EngineFailedError):
                    breaker.failed(ticket, batch=exc.__cause__)  # one failure per failed batch
                else:
                    breaker.release(ticket)
            raise
        except BaseException:  # cancelled: the caller went away, which says nothing about the engine
            if breaker is not None and ticket is not None:
                breaker.release(ticket)
            raise
        if breaker is not None and ticket is not None:
            breaker.succeeded(ticket)
        statistics.request_succeeded(time.perf_counter_ns() - started)
        if request.outputs:
            outputs = {name: outputs[name] for name in request.outputs}
        return InferenceResult(target.name, target.version, outputs)
