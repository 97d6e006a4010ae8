"""Streams, events and graphs: work runs lazily, in stream order, only when the host waits for it.

Enqueuing an operation computes its place in virtual time at once (it starts at the latest of: the end of the
previous operation on its stream, the end of the event records it waits for, and the enqueuing thread's virtual
clock) but runs its effect (the bytes it copies, the inference it computes) only when a host synchronization
needs it: the stream up to that point, and, through cudaStreamWaitEvent, what the other streams owe it. Anything
the code forgot to wait for has simply not happened yet, so missing dependencies give wrong numbers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tests.support.gpu_simulator.core import Fault, SimState, TimelineEntry

__all__ = ["Event", "Graph", "GraphExec", "Node", "Op", "Scheduler", "Stream"]

# What a queued operation does when it finally runs; raises Fault on misuse found then.
Action = Callable[[], None]


@dataclass(eq=False, slots=True)
class Node:
    """A unit of work: a copy or an inference (also what a captured graph is made of)."""

    kind: str
    label: str
    cost: float
    action: Action | None


@dataclass(eq=False)
class Op:
    """A node queued on a stream, with its dependencies and virtual times."""

    seq: int
    stream: Stream
    kind: str  # node kinds, plus "record", "wait" and "graph"
    label: str
    nodes: list[Node]
    deps: list[Op]
    start: float
    end: float
    done: bool = False


@dataclass(eq=False)
class Stream:
    """A simulated CUDA stream on one device."""

    handle: int
    device: int
    flags: int
    pending: deque[Op] = field(default_factory=deque)
    last: Op | None = None  # the last op enqueued (done or not), what a stream synchronization waits for
    tail_end: float = 0.0
    destroyed: bool = False
    capture: list[Node] | None = None  # the nodes recorded while capturing


@dataclass(eq=False)
class Event:
    """A simulated CUDA event: what it waits for is its latest record."""

    handle: int
    flags: int
    record: Op | None = None
    destroyed: bool = False


@dataclass(eq=False)
class Graph:
    """A graph captured from a stream: its nodes, with the addresses and shapes they had at capture."""

    handle: int
    device: int
    nodes: list[Node]
    destroyed: bool = False


@dataclass(eq=False)
class GraphExec:
    """An instantiated graph, launchable on any stream of its device."""

    handle: int
    graph: Graph
    nodes: list[Node]
    destroyed: bool = False


class Scheduler:
    """Queues operations on streams and runs them when a synchronization needs them."""

    STREAM_BASE = 0x5_7000_0000
    EVENT_BASE = 0xE_7000_0000
    GRAPH_BASE = 0x6_7000_0000
    GRAPH_EXEC_BASE = 0x6_8000_0000

    def __init__(self, state: SimState) -> None:
        self._state = state
        self._seq = 0
        self._handles = 0
        self.streams: dict[int, Stream] = {}
        self.default_streams: dict[int, Stream] = {}
        self.events: dict[int, Event] = {}
        self.graphs: dict[int, Graph] = {}
        self.graph_execs: dict[int, GraphExec] = {}
        # Faults found while running queued work, reported by the synchronization that ran it.
        self._faults: list[str] = []

    def _handle(self, base: int) -> int:
        self._handles += 1
        return base + self._handles * 0x100

    # Objects

    def create_stream(self, device: int, flags: int) -> Stream:
        """A new stream on `device`."""
        stream = Stream(self._handle(self.STREAM_BASE), device, flags)
        self.streams[stream.handle] = stream
        return stream

    def default_stream(self, device: int) -> Stream:
        """The device's default stream (handle 0; no implicit synchronization with other streams is simulated)."""
        stream = self.default_streams.get(device)
        if stream is None:
            stream = self.default_streams[device] = Stream(0, device, 0)
        return stream

    def create_event(self, flags: int) -> Event:
        """A new event, never recorded (waiting on it waits for nothing)."""
        event = Event(self._handle(self.EVENT_BASE), flags)
        self.events[event.handle] = event
        return event

    def create_graph(self, device: int, nodes: list[Node]) -> Graph:
        """A graph of captured nodes."""
        graph = Graph(self._handle(self.GRAPH_BASE), device, nodes)
        self.graphs[graph.handle] = graph
        return graph

    def instantiate(self, graph: Graph) -> GraphExec:
        """An executable copy of `graph`."""
        graph_exec = GraphExec(self._handle(self.GRAPH_EXEC_BASE), graph, list(graph.nodes))
        self.graph_execs[graph_exec.handle] = graph_exec
        return graph_exec

    # Queueing

    def enqueue(self, stream: Stream, nodes: list[Node], *, kind: str, label: str, deps: Iterable[Op] = ()) -> None:
        """Queue work on `stream` (or record it, when the stream is capturing)."""
        if stream.capture is not None and kind not in ("record", "wait"):
            stream.capture.extend(nodes)
            return
        dep_list = list(deps)
        start = max([stream.tail_end, self._state.host_time, *(d.end for d in dep_list)])
        end = start + sum(node.cost for node in nodes)
        self._seq += 1
        op = Op(self._seq, stream, kind, label, nodes, dep_list, start, end)
        stream.pending.append(op)
        stream.last = op
        stream.tail_end = end

    def record(self, event: Event, stream: Stream) -> None:
        """cudaEventRecord: the event now stands for everything queued on `stream` so far."""
        self.enqueue(stream, [], kind="record", label=f"record event {event.handle:#x}")
        event.record = stream.last

    def wait(self, stream: Stream, event: Event) -> None:
        """cudaStreamWaitEvent: later work on `stream` waits for the event's latest record (if any)."""
        deps = [event.record] if event.record is not None else []
        self.enqueue(stream, [], kind="wait", label=f"wait event {event.handle:#x}", deps=deps)

    # Running

    def run_through(self, target: Op | None) -> list[str]:
        """Run everything `target` depends on, and `target`; the faults found on the way."""
        if target is None:
            return []
        self._faults = []
        # Dependencies always point to earlier ops, so this walk ends; a stack, not recursion, for long chains.
        stack = [target]
        while stack:
            top = stack[-1]
            if top.done:
                stack.pop()
                continue
            head = top.stream.pending[0]
            blocking = [d for d in head.deps if not d.done]
            if blocking:
                stack.append(blocking[0])
                continue
            self._run(head)
        self._state.advance_host_time(target.end)
        return self._faults

    def run_streams(self, streams: Iterable[Stream]) -> list[str]:
        """Run every stream to its end (cudaDeviceSynchronize); the faults found."""
        faults: list[str] = []
        for stream in list(streams):
            faults.extend(self.run_through(stream.last))
        return faults

    def _run(self, op: Op) -> None:
        op.stream.pending.popleft()
        op.done = True
        at = op.start
        for node in op.nodes:
            try:
                if node.action is not None:
                    node.action()
            except Fault as fault:
                self._faults.append(str(fault))
                self._state.record_misuse(str(fault))
            label = node.label if op.kind != "graph" else f"{op.label}: {node.label}"
            self._state.timeline.append(
                TimelineEntry(op.stream.device, op.stream.handle, node.kind, at, at + node.cost, label)
            )
            at += node.cost

    # Accounting

    def live(self) -> dict[str, int]:
        """Live streams, events, graphs and executable graphs."""
        return {
            "stream": sum(not s.destroyed for s in self.streams.values()),
            "event": sum(not e.destroyed for e in self.events.values()),
            "graph": sum(not g.destroyed for g in self.graphs.values()),
            "graph_exec": sum(not g.destroyed for g in self.graph_execs.values()),
        }
