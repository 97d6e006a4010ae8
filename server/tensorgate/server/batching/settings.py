"""The batcher's settings: a model config's `max_batch_size` and `dynamic_batching`, checked once."""

from __future__ import annotations

from dataclasses import dataclass

from tensorgate.server.errors import ModelConfigError

__all__ = ["BatcherSettings"]


@dataclass(frozen=True, slots=True)
class BatcherSettings:
    """How one model version is batched (the model config's `max_batch_size` and `dynamic_batching`).

    Invalid settings raise `ModelConfigError` naming the field.
    """

    max_batch_size: int
    """Rows per batch at most. 0: no batch dimension; every request runs alone with its inputs untouched."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes (rows) to aim for. A batch dispatches at once when it reaches the largest; a larger batch
    is cut back to the largest preferred size it can be cut to without splitting a request."""
    max_queue_delay: float = 0.0
    """Seconds a batch below the target size may wait, counted from its oldest request's arrival."""
    max_queue_size: int = 1024
    """Requests waiting at most; beyond it `submit` raises `ResourceExhaustedError`."""
    priority_levels: int = 1
    """Priority levels 1 (highest) .. priority_levels."""
    default_priority: int = 1
    """The level of requests that give priority 0."""
    default_timeout: float | None = None
    """Seconds a request without a deadline of its own may wait in the queue; None: no limit."""
    instances: int = 1
    """Engine instances, i.e. batches that may run at once."""

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ModelConfigError:
            return ModelConfigError(f"batcher setting {field}: {why}")

        if self.max_batch_size < 0:
            raise bad("max_batch_size", f"{self.max_batch_size} is negative")
        for size in self.preferred_batch_sizes:
            if self.max_batch_size == 0 or not 1 <= size <= self.max_batch_size:
                why = f"{size} is outside 1..max_batch_size={self.max_batch_size}"
                raise bad("preferred_batch_sizes", why)
        if not self.max_queue_delay >= 0:
            raise bad("max_queue_delay", f"{self.max_queue_delay} is negative")
        if self.max_queue_size < 1:
            raise bad("max_queue_size", f"{self.max_queue_size} is below 1")
        if self.priority_levels < 1:
            raise bad("priority_levels", f"{self.priority_levels} is below 1")
        if not 1 <= self.default_priority <= self.priority_levels:
            raise bad("default_priority", f"{self.default_priority} is outside 1..{self.priority_levels}")
        if self.default_timeout is not None and not self.default_timeout > 0:
            raise bad("default_timeout", f"{self.default_timeout} is not positive")
        if self.instances < 1:
            raise bad("instances", f"{self.instances} is below 1")

    @property
    def target_batch_size(self) -> int:
        """Rows at which a batch dispatches without waiting: the largest preferred size or max_batch_size."""
        return max(self.preferred_batch_sizes, default=self.max_batch_size)
