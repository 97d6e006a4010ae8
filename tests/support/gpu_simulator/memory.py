"""Simulated device memory and real page-locked host memory, with use-after-free and bounds checks.

Device pointers are integers above the 48-bit canonical address range (dereferencing one from the host would
fault, as on a real GPU), mapped to bytearrays the simulator owns. Addresses are never reused, and a gap is left
after each allocation, so a stale pointer or an overrun is found rather than landing in a neighbour. Host memory
from cudaHostAlloc is real memory at a real address (the engine builds numpy views over it with ctypes); after
cudaFreeHost it is filled with 0xFF (NaN as floats) but kept mapped, so a stale view reads garbage, not a crash.
"""

from __future__ import annotations

import bisect
import ctypes
from dataclasses import dataclass, field
from typing import TypeVar

from tests.support.gpu_simulator.core import Fault

__all__ = ["DEVICE_BASE", "POISON", "DeviceAllocation", "HostAllocation", "Memory"]

#: First device address: above the 48-bit user address space, so the host cannot read it by accident.
DEVICE_BASE = 0xD0_0000_0000_0000
_DEVICE_SPAN = 1 << 44  # address space per simulated device
_ALIGN = 256  # cudaMalloc's alignment
_GUARD = 4096  # unused gap after each allocation, so an overrun is out of bounds, not in the next buffer
#: The byte fresh device memory and freed host memory are filled with (0xFFFFFFFF is NaN as float32).
POISON = 0xFF


@dataclass(eq=False, slots=True)
class DeviceAllocation:
    """One cudaMalloc: `data` is None once freed (the record stays, to recognise use after free)."""

    base: int
    size: int
    device: int
    data: bytearray | None


@dataclass(eq=False, slots=True)
class HostAllocation:
    """One cudaHostAlloc: real memory, kept mapped (and poisoned) after cudaFreeHost."""

    base: int
    size: int
    buffer: ctypes.Array[ctypes.c_ubyte]
    freed: bool = False


_A = TypeVar("_A", DeviceAllocation, HostAllocation)


def _find(bases: list[int], table: dict[int, _A], ptr: int) -> _A | None:
    index = bisect.bisect_right(bases, ptr) - 1
    if index < 0:
        return None
    alloc = table[bases[index]]
    # One past the end is still "this allocation" for naming the error; the bounds check rejects it.
    return alloc if ptr <= alloc.base + alloc.size else None


@dataclass(eq=False)
class Memory:
    """All allocations of one simulated machine."""

    device_allocations: dict[int, DeviceAllocation] = field(default_factory=dict)
    host_allocations: dict[int, HostAllocation] = field(default_factory=dict)
    _device_bases: list[int] = field(default_factory=list)
    _host_bases: list[int] = field(default_factory=list)
    _next: dict[int, int] = field(default_factory=dict)

    # Allocation

    def malloc(self, device: int, size: int) -> int:
        """A fresh device allocation filled with POISON (uninitialised memory is never zeros you can rely on)."""
        if size == 0:
            return 0
        base = self._next.get(device, DEVICE_BASE + device * _DEVICE_SPAN)
        self._next[device] = base + (size + _GUARD + _ALIGN - 1) // _ALIGN * _ALIGN
        self.device_allocations[base] = DeviceAllocation(base, size, device, bytearray([POISON]) * size)
        bisect.insort(self._device_bases, base)
        return base

    def free(self, ptr: int) -> str | None:
        """Free a device allocation; a message describing the misuse if it cannot be freed."""
        if ptr == 0:
            return None  # cudaFree(0) is a no-op
        alloc = self.device_allocations.get(ptr)
        if alloc is None:
            inside = _find(self._device_bases, self.device_allocations, ptr)
            if inside is not None:
                return f"cudaFree({ptr:#x}): not the start of an allocation (base {inside.base:#x})"
            return f"cudaFree({ptr:#x}): unknown device pointer"
        if alloc.data is None:
            return f"double free: cudaFree({ptr:#x}) of an allocation already freed"
        alloc.data = None
        return None

    def host_alloc(self, size: int) -> int:
        """Real page-locked-standing host memory; its address is what cudaHostAlloc returns."""
        buffer = (ctypes.c_ubyte * max(size, 1))()
        base = ctypes.addressof(buffer)
        self.host_allocations[base] = HostAllocation(base, size, buffer)
        bisect.insort(self._host_bases, base)
        return base

    def free_host(self, ptr: int) -> str | None:
        """Free (poison) a host allocation; a message describing the misuse if it cannot be freed."""
        alloc = self.host_allocations.get(ptr)
        if alloc is None:
            return f"cudaFreeHost({ptr:#x}): not a pointer from cudaHostAlloc"
        if alloc.freed:
            return f"double free: cudaFreeHost({ptr:#x}) of an allocation already freed"
        alloc.freed = True
        ctypes.memset(alloc.base, POISON, alloc.size)
        return None

    # Lookup and access (raise Fault naming the problem)

    def is_device(self, ptr: int) -> bool:
        """Whether `ptr` lies in the simulated device address range."""
        return ptr >= DEVICE_BASE

    def device_allocation(self, ptr: int, count: int, what: str) -> DeviceAllocation:
        """The live device allocation holding [ptr, ptr+count)."""
        alloc = _find(self._device_bases, self.device_allocations, ptr)
        if alloc is None:
            raise Fault(f"{what}: {ptr:#x} is not device memory from cudaMalloc")
        if alloc.data is None:
            raise Fault(f"use after free: {what} uses device memory {ptr:#x} freed by cudaFree")
        if ptr + count > alloc.base + alloc.size:
            raise Fault(
                f"{what}: {count} bytes at {ptr:#x} overrun the {alloc.size}-byte device allocation at "
                f"{alloc.base:#x} by {ptr + count - alloc.base - alloc.size} bytes"
            )
        return alloc

    def host_allocation(self, ptr: int, count: int, what: str) -> HostAllocation:
        """The live pinned host allocation holding [ptr, ptr+count)."""
        alloc = _find(self._host_bases, self.host_allocations, ptr)
        if alloc is None:
            raise Fault(
                f"{what}: host pointer {ptr:#x} is not page-locked memory from cudaHostAlloc "
                "(pageable memory cannot be copied asynchronously)"
            )
        if alloc.freed:
            raise Fault(f"use after free: {what} uses host memory {ptr:#x} freed by cudaFreeHost")
        if ptr + count > alloc.base + alloc.size:
            raise Fault(
                f"{what}: {count} bytes at {ptr:#x} overrun the {alloc.size}-byte host allocation at "
                f"{alloc.base:#x} by {ptr + count - alloc.base - alloc.size} bytes"
            )
        return alloc

    def read(self, ptr: int, count: int, what: str) -> bytes:
        """The bytes at a device or pinned host address, checked."""
        if self.is_device(ptr):
            alloc = self.device_allocation(ptr, count, what)
            assert alloc.data is not None
            offset = ptr - alloc.base
            return bytes(alloc.data[offset : offset + count])
        self.host_allocation(ptr, count, what)
        return ctypes.string_at(ptr, count)

    def write(self, ptr: int, data: bytes, what: str) -> None:
        """Store bytes at a device or pinned host address, checked."""
        if self.is_device(ptr):
            alloc = self.device_allocation(ptr, len(data), what)
            assert alloc.data is not None
            offset = ptr - alloc.base
            alloc.data[offset : offset + len(data)] = data
            return
        self.host_allocation(ptr, len(data), what)
        ctypes.memmove(ptr, data, len(data))

    # Leak accounting

    def live_device(self) -> list[DeviceAllocation]:
        """Device allocations not yet freed."""
        return [a for a in self.device_allocations.values() if a.data is not None]

    def live_host(self) -> list[HostAllocation]:
        """Host allocations not yet freed."""
        return [a for a in self.host_allocations.values() if not a.freed]
