"""Telemetry inside the data path: the request probe (route, queue, batch, scatter) and the batch instrumentation
(the batch's `infer` span with links to its members, engine busy time, batch size and per-batch stage times).

Neither imports OpenTelemetry or prometheus_client: they call the `Tracing` and `Metrics` objects they are given,
and with neither they are not installed at all (`InferenceService` and `Repository` then take their plain paths).

Spans of one traced unary request, all children of its server span (streams: of the frame's span):

    tensorgate.v1.Predict/Predict   (SERVER; batch id and size recorded on it)
    ├── decode      arrival -> the core          (made by the interceptor)
    ├── route       the repository resolves the model and version
    ├── queue       submitted -> its batch starts forming
    ├── batch       the batch's inputs are concatenated
    ├── infer       the engine runs the batch: ONE span per batch, a child of its first traced member, with a
    │               link to every traced member's span
    ├── scatter     the engine returned -> this request has its rows
    └── encode      the core -> the response is built   (made by the interceptor)
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tensorgate.engines import Engine
from tensorgate.server.batching import Array, BatchObserver, RequestTimes, RunBatch, current_batch
from tensorgate.server.inference import InferenceRequest, InferenceResult, InferenceService
from tensorgate.server.telemetry.context import RequestTrace, _request, _scope

if TYPE_CHECKING:
    from tensorgate.server.telemetry.metrics import Metrics, StageTimers
    from tensorgate.server.telemetry.tracing import Tracing

__all__ = ["BatchTelemetry", "RequestProbe", "TracedCount"]

_NS = 1e-9


class TracedCount:
    """Traced requests inside the core right now: while there are none, a batch need not look for its members'
    spans (at 1% sampling, most batches)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class RequestProbe:
    """`InferenceService`'s probe: times and traces each request's stages from routing to its result."""

    def __init__(self, tracing: Tracing | None, metrics: Metrics | None, traced: TracedCount | None = None) -> None:
        self._tracing = tracing
        self._metrics = metrics
        self._traced = traced if traced is not None else TracedCount()

    async def infer(self, service: InferenceService, request: InferenceRequest) -> InferenceResult:
        """Route and run `request` through `service`, recording what happened."""
        scope = _scope.get()
        tracing = self._tracing
        entered = time.time_ns()
        traced: RequestTrace | None = None
        streaming = scope is not None and scope.info.streaming
        if scope is not None:
            if not streaming:
                scope.entered_ns = entered
                scope.request_id = request.request_id
            if tracing is not None and scope.span is not None:
                if not streaming:
                    traced = RequestTrace(scope.span, request.request_id)
                elif tracing.sample_frame():
                    name = "frame" if scope.info.method == "Stream" else "request"
                    span = tracing.start_span(name, scope.span, entered, {"tensorgate.request_id": request.request_id})
                    traced = RequestTrace(span, request.request_id)
        if traced is None:
            return await self._infer(service, request, scope, None, entered, streaming)
        token = _request.set(traced)
        self._traced.value += 1
        try:
            return await self._infer(service, request, scope, traced, entered, streaming)
        finally:
            self._traced.value -= 1
            _request.reset(token)

    async def _infer(
        self,
        service: InferenceService,
        request: InferenceRequest,
        scope: Any,
        traced: RequestTrace | None,
        entered: int,
        streaming: bool,
    ) -> InferenceResult:
        tracing = self._tracing
        try:
            target = service.route(request)
        except BaseException as exc:
            if traced is not None and tracing is not None:
                failed = time.time_ns()
                tracing.record("route", traced.span, entered, failed, error=exc)
                if streaming:
                    _end(tracing, traced.span, failed, exc)
            raise
        routed = time.time_ns()
        model, version = target.name, str(target.version)
        if scope is not None:
            scope.model, scope.version = model, version
        times = request.times
        if times is None and (traced is not None or self._metrics is not None):
            times = request.times = RequestTimes()
        error: BaseException | None = None
        try:
            return await service.run(target, request, tag=traced)
        except BaseException as exc:
            error = exc
            raise
        finally:
            done = time.time_ns()
            if scope is not None and not streaming:
                scope.returned_ns = done
            if self._metrics is not None:
                stages = self._metrics.stages(model, version)
                stages.route.observe((routed - entered) * _NS)
                if error is None and times is not None:
                    stages.queue.observe(times.queued)
            if traced is not None and tracing is not None and times is not None:
                self._trace(tracing, traced, model, version, entered, routed, done, times, error)
                if streaming:
                    _end(tracing, traced.span, done, error)

    @staticmethod
    def _trace(
        tracing: Tracing,
        traced: RequestTrace,
        model: str,
        version: str,
        entered: int,
        routed: int,
        done: int,
        times: RequestTimes,
        error: BaseException | None,
    ) -> None:
        span = traced.span
        span.set_attributes(
            {"tensorgate.model": model, "tensorgate.model.version": version, "tensorgate.request_id": traced.request_id}
        )
        tracing.record("route", span, entered, routed)
        if not traced.infer_start_ns:  # it never reached an engine: failed checks, queue full, expired, cancelled
            tracing.record("queue", span, routed, done, error=error)
            return
        queued_until = routed + int(times.queued * 1e9) if error is None else traced.infer_start_ns
        queued_until = min(queued_until, traced.infer_start_ns)
        tracing.record("queue", span, routed, queued_until)
        tracing.record("batch", span, queued_until, traced.infer_start_ns)
        if error is None:
            tracing.record("scatter", span, traced.infer_end_ns, done)


def _end(tracing: Tracing, span: Any, end_ns: int, error: BaseException | None) -> None:
    if error is not None:
        from tensorgate.server.telemetry.tracing import fail

        fail(span, error)
    span.end(end_time=end_ns)


class _Observer:
    """The batcher's observer: the version's statistics first, then the batch's metrics."""

    __slots__ = ("_inner", "_stages")

    def __init__(self, inner: BatchObserver, stages: StageTimers) -> None:
        self._inner = inner
        self._stages = stages

    def batch_ran(self, rows: int, requests: int, queued: float, gather: float, infer: float, scatter: float) -> None:
        self._inner.batch_ran(rows, requests, queued, gather, infer, scatter)
        stages = self._stages
        stages.batch_size.observe(rows)
        stages.batch.observe(gather)
        stages.infer.observe(infer)
        stages.scatter.observe(scatter)


class BatchTelemetry:
    """The repository's instrumentation: wraps each version's batch runner and observer."""

    def __init__(self, tracing: Tracing | None, metrics: Metrics | None, traced: TracedCount | None = None) -> None:
        self._tracing = tracing
        self._metrics = metrics
        self._traced = traced if traced is not None else TracedCount()
        self._batch_ids = itertools.count(1)

    def instrument(
        self, model: str, version: int, engine: Engine, run_batch: RunBatch, observer: BatchObserver
    ) -> tuple[RunBatch, BatchObserver]:
        """The batch runner and observer to give the version's batcher."""
        label = str(version)
        metrics, tracing = self._metrics, self._tracing
        busy: dict[int, Any] = {}
        if metrics is not None:
            observer = _Observer(observer, metrics.stages(model, label))
            busy = {i: metrics.engine_busy(model, label, i) for i in range(engine.instance_count)}
        engine_name = engine.description
        batch_ids = self._batch_ids
        traced = self._traced

        def busy_for(instance: int) -> Any:
            counter = busy.get(instance)
            if counter is None and metrics is not None:
                counter = busy[instance] = metrics.engine_busy(model, label, instance)
            return counter

        async def run(instance: int, inputs: dict[str, Array]) -> Mapping[str, Array]:
            batch = current_batch() if tracing is not None and traced.value else None
            members = [tag for tag in batch.tags if isinstance(tag, RequestTrace)] if batch is not None else None
            if not members:
                if metrics is None:
                    return await run_batch(instance, inputs)
                started = time.perf_counter()
                try:
                    return await run_batch(instance, inputs)
                finally:
                    busy_for(instance).inc(time.perf_counter() - started)
            assert tracing is not None
            assert batch is not None
            batch_id = next(batch_ids)
            start = time.time_ns()
            span = tracing.start_span(
                "infer",
                members[0].span,
                start,
                {
                    "tensorgate.model": model,
                    "tensorgate.model.version": label,
                    "tensorgate.engine": engine_name,
                    "tensorgate.engine.instance": instance,
                    "tensorgate.batch.id": batch_id,
                    "tensorgate.batch.size": batch.rows,
                    "tensorgate.batch.requests": len(batch.request_ids),
                    "tensorgate.batch.request_ids": batch.request_ids,
                },
                links=[member.span for member in members],
            )
            for member in members:
                member.batch_id, member.batch_size, member.infer_start_ns = batch_id, batch.rows, start
                member.span.set_attributes({"tensorgate.batch.id": batch_id, "tensorgate.batch.size": batch.rows})
            try:
                return await run_batch(instance, inputs)
            except BaseException as exc:
                from tensorgate.server.telemetry.tracing import fail

                fail(span, exc)
                raise
            finally:
                end = time.time_ns()
                span.end(end_time=end)
                for member in members:
                    member.infer_end_ns = end
                if metrics is not None:
                    busy_for(instance).inc((end - start) * _NS)

        return run, observer
