"""The two messages of `grpc.health.v1.Health/Check`, encoded by hand.

Why by hand: the generated classes live in grpcio-health-checking, which the light client does not depend
on, and making `health` work only when an extra package happens to be installed would break `tensorgate
health` as a readiness probe in slim images. The protocol is published and frozen, and each message has a
single field:

    message HealthCheckRequest  { string service = 1; }
    message HealthCheckResponse { ServingStatus status = 1; }   // enum: varint

so the wire format is a few lines: a tag byte, a varint. The decoder skips fields it does not know, as
protobuf does, and the unit tests check both directions against grpcio-health-checking's generated messages.
"""

from __future__ import annotations

__all__ = ["CHECK_METHOD", "SERVING_STATUS_NAMES", "decode_check_response", "encode_check_request"]

CHECK_METHOD = "/grpc.health.v1.Health/Check"

#: HealthCheckResponse.ServingStatus numbers and names.
SERVING_STATUS_NAMES: dict[int, str] = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _decode_varint(data: bytes, offset: int) -> tuple[int, int]:
    """The varint at `offset` and the offset after it."""
    value = 0
    for index in range(_MAX_VARINT_BYTES):
        if offset + index >= len(data):
            raise ValueError("health response: truncated varint")
        byte = data[offset + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, offset + index + 1
    raise ValueError("health response: varint longer than 10 bytes")


def encode_check_request(service: str) -> bytes:
    """Serialize `HealthCheckRequest{service}` (empty for the server as a whole, as proto3 omits defaults)."""
    if not service:
        return b""
    data = service.encode("utf-8")
    return b"\x0a" + _encode_varint(len(data)) + data  # field 1, wire type LEN


def decode_check_response(data: bytes) -> str:
    """Parse a `HealthCheckResponse` and return its status name, e.g. "SERVING"."""
    status = 0
    offset = 0
    while offset < len(data):
        key, offset = _decode_varint(data, offset)
        field, wire_type = key >> 3, key & 0x07
        if wire_type == _VARINT:
            value, offset = _decode_varint(data, offset)
            if field == 1:
                status = value  # the last occurrence wins, as in protobuf
        elif wire_type == _LEN:
            length, offset = _decode_varint(data, offset)
            offset += length
        elif wire_type == _I64:
            offset += 8
        elif wire_type == _I32:
            offset += 4
        else:
            raise ValueError(f"health response: unsupported wire type {wire_type}")
        if offset > len(data):
            raise ValueError("health response: truncated field")
    if status >= 1 << 63:  # an int32 enum sent as a negative number: ten-byte two's complement
        status -= 1 << 64
    return SERVING_STATUS_NAMES.get(status, f"STATUS_{status}")
