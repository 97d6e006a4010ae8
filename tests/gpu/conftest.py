"""The real-GPU suite (marked `gpu` by folder; `make test-gpu` installs the tensorrt extra and runs it).

Every test here is skipped unless the real `tensorrt` imports and CUDA sees at least one GPU. The CPU simulator
(tests/support/gpu_simulator) is never used here: it checks our orchestration; this suite checks TensorRT and the
hardware. CI machines have no GPU, so this suite does not run there.
"""

from __future__ import annotations

import functools
import importlib

import pytest

__all__ = ["gpu_unavailable"]


@functools.cache
def gpu_unavailable() -> str | None:
    """Why the suite cannot run here, or None when TensorRT imports and CUDA sees a GPU."""
    try:
        importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:  # OSError: bindings installed, libnvinfer missing
        return f"TensorRT cannot be imported ({exc}); `make test-gpu` installs tensorgate[tensorrt]"
    try:
        cudart = importlib.import_module("cuda.bindings.runtime")
    except (ImportError, OSError) as exc:
        return f"cuda-python cannot be imported ({exc}); `make test-gpu` installs tensorgate[tensorrt]"
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess:
        return f"no CUDA GPU here (cudaGetDeviceCount: {getattr(error, 'name', error)})"
    if count < 1:
        return "no CUDA GPU here (cudaGetDeviceCount: 0 devices)"
    return None


@pytest.fixture(scope="session", autouse=True)
def _require_a_gpu() -> None:
    # Session scope: it runs before the module-scoped fixtures that build plans, so they never run without a GPU.
    reason = gpu_unavailable()
    if reason is not None:
        pytest.skip(reason)
