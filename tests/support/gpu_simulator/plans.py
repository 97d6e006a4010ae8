"""The simulator's plan and timing-cache formats.

A plan is `PLAN_MAGIC`, a little-endian uint32 header length, a JSON header (TensorRT version, device name and
compute capability, I/O tensors, optimization profiles, builder settings) and the ONNX model's bytes. A timing
cache is `CACHE_MAGIC` and JSON (TensorRT version and the keys of the models it has "timed").
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CACHE_MAGIC",
    "PLAN_MAGIC",
    "PlanError",
    "PlanHeader",
    "PlanTensor",
    "Profile",
    "decode_plan",
    "decode_timing_cache",
    "encode_plan",
    "encode_timing_cache",
]

PLAN_MAGIC = b"TGSIMPLN"
CACHE_MAGIC = b"TGSIMTC\x00"
_FORMAT = 1

#: Per input name: (min, opt, max) shapes.
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


class PlanError(ValueError):
    """Bytes that are not a plan (or timing cache) of this simulator's format."""


@dataclass(frozen=True, slots=True)
class PlanTensor:
    """One I/O tensor of a plan: its DataType name and its shape with -1 for dynamic dimensions."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PlanHeader:
    """What a plan says about itself."""

    trt_version: str
    device_name: str
    compute_capability: tuple[int, int]
    name: str
    inputs: tuple[PlanTensor, ...]
    outputs: tuple[PlanTensor, ...]
    profiles: tuple[Profile, ...]
    builder: dict[str, Any] = field(default_factory=dict)


def _tensor_json(tensor: PlanTensor) -> dict[str, Any]:
    return {"name": tensor.name, "dtype": tensor.dtype, "shape": list(tensor.shape)}


def _tensor(data: dict[str, Any]) -> PlanTensor:
    return PlanTensor(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]))


def encode_plan(header: PlanHeader, onnx_bytes: bytes) -> bytes:
    """Serialize a plan."""
    body = {
        "format": _FORMAT,
        "trt_version": header.trt_version,
        "device_name": header.device_name,
        "compute_capability": list(header.compute_capability),
        "name": header.name,
        "inputs": [_tensor_json(t) for t in header.inputs],
        "outputs": [_tensor_json(t) for t in header.outputs],
        "profiles": [{name: [list(s) for s in shapes] for name, shapes in p.items()} for p in header.profiles],
        "builder": header.builder,
    }
    encoded = json.dumps(body, sort_keys=True).encode()
    return PLAN_MAGIC + struct.pack("<I", len(encoded)) + encoded + onnx_bytes


def decode_plan(data: bytes) -> tuple[PlanHeader, bytes]:
    """The header and ONNX bytes of a plan; PlanError for anything else."""
    if not data.startswith(PLAN_MAGIC) or len(data) < len(PLAN_MAGIC) + 4:
        raise PlanError("not a serialized engine (bad magic)")
    (length,) = struct.unpack_from("<I", data, len(PLAN_MAGIC))
    start = len(PLAN_MAGIC) + 4
    try:
        body = json.loads(data[start : start + length])
        if body.get("format") != _FORMAT:
            raise PlanError(f"unknown plan format {body.get('format')!r}")
        profiles = tuple(
            {name: (tuple(s[0]), tuple(s[1]), tuple(s[2])) for name, s in profile.items()}
            for profile in body["profiles"]
        )
        header = PlanHeader(
            trt_version=str(body["trt_version"]),
            device_name=str(body["device_name"]),
            compute_capability=(int(body["compute_capability"][0]), int(body["compute_capability"][1])),
            name=str(body["name"]),
            inputs=tuple(_tensor(t) for t in body["inputs"]),
            outputs=tuple(_tensor(t) for t in body["outputs"]),
            profiles=profiles,
            builder=dict(body["builder"]),
        )
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise PlanError(f"corrupt plan header: {error}") from error
    onnx_bytes = data[start + length :]
    if not onnx_bytes:
        raise PlanError("truncated plan: no network")
    return header, onnx_bytes


def encode_timing_cache(trt_version: str, entries: list[str]) -> bytes:
    """Serialize a timing cache."""
    return CACHE_MAGIC + json.dumps({"trt_version": trt_version, "entries": sorted(set(entries))}).encode()


def decode_timing_cache(data: bytes) -> tuple[str, list[str]]:
    """A timing cache's TensorRT version and entries; PlanError for anything else."""
    if not data.startswith(CACHE_MAGIC):
        raise PlanError("not a timing cache (bad magic)")
    try:
        body = json.loads(data[len(CACHE_MAGIC) :])
        return str(body["trt_version"]), [str(e) for e in body["entries"]]
    except (ValueError, KeyError, TypeError) as error:
        raise PlanError(f"corrupt timing cache: {error}") from error
