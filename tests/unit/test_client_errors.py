"""The client's exception tree: every gRPC status code has its class; conversion keeps code and message."""

from __future__ import annotations

import grpc
import pytest

from tensorgate.client import _common, errors
from tensorgate.client.errors import TensorgateClientError

NON_OK_CODES = [code for code in grpc.StatusCode if code is not grpc.StatusCode.OK]

EXPECTED_CLASSES: dict[grpc.StatusCode, type[TensorgateClientError]] = {
    grpc.StatusCode.CANCELLED: errors.CallCancelledError,
    grpc.StatusCode.UNKNOWN: errors.UnknownError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.ABORTED: errors.AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: errors.UnimplementedError,
    grpc.StatusCode.INTERNAL: errors.InternalError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.DATA_LOSS: errors.DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: errors.UnauthenticatedError,
}


class FakeRpcError(grpc.RpcError):
    """What a sync call raises: an RpcError that is also a grpc.Call with code() and details()."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__()
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


def aio_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details, debug_error_string=None
    )


def test_every_code_has_a_class() -> None:
    assert set(EXPECTED_CLASSES) == set(NON_OK_CODES)


@pytest.mark.parametrize("code", NON_OK_CODES, ids=lambda code: code.name)
def test_sync_rpc_error_becomes_its_class(code: grpc.StatusCode) -> None:
    error = errors.from_rpc_error(FakeRpcError(code, "model 'x' is not in the repository"))

    assert type(error) is EXPECTED_CLASSES[code]
    assert isinstance(error, TensorgateClientError)
    assert error.code is code
    assert error.details == "model 'x' is not in the repository"
    assert str(error) == f"{code.name}: model 'x' is not in the repository"


@pytest.mark.parametrize("code", NON_OK_CODES, ids=lambda code: code.name)
def test_aio_rpc_error_becomes_its_class(code: grpc.StatusCode) -> None:
    error = errors.from_rpc_error(aio_error(code, "tensor 'image': expected FP32, got INT64"))

    assert type(error) is EXPECTED_CLASSES[code]
    assert error.code is code
    assert error.details == "tensor 'image': expected FP32, got INT64"


def test_each_class_names_its_code() -> None:
    for code, cls in EXPECTED_CLASSES.items():
        assert cls.status is code
        assert cls.__doc__


def test_missing_details_are_empty() -> None:
    error = errors.from_rpc_error(FakeRpcError(grpc.StatusCode.INTERNAL, None))

    assert error.details == ""
    assert str(error) == "INTERNAL"


def test_bare_rpc_error_is_unknown() -> None:
    error = errors.from_rpc_error(grpc.RpcError())

    assert type(error) is errors.UnknownError
    assert error.code is grpc.StatusCode.UNKNOWN


def test_ok_code_falls_back_to_the_root() -> None:
    error = errors.error_for_code(grpc.StatusCode.OK, "")

    assert type(error) is TensorgateClientError


def test_only_unavailable_is_retryable() -> None:
    assert [code for code, cls in EXPECTED_CLASSES.items() if cls.retryable] == [grpc.StatusCode.UNAVAILABLE]


def test_cancelled_is_not_asyncio_cancelled() -> None:
    import asyncio

    assert not issubclass(errors.CallCancelledError, asyncio.CancelledError)


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda code: code.name)
def test_status_code_from_number(code: grpc.StatusCode) -> None:
    assert errors.status_code_from_number(code.value[0]) is code


def test_status_code_from_unknown_number() -> None:
    assert errors.status_code_from_number(99) is grpc.StatusCode.UNKNOWN


def test_rpc_errors_converts_and_chains() -> None:
    original = FakeRpcError(grpc.StatusCode.NOT_FOUND, "no model 'x'")

    with pytest.raises(errors.NotFoundError) as caught, _common.rpc_errors():
        raise original

    assert caught.value.__cause__ is original
    assert caught.value.details == "no model 'x'"


def test_rpc_errors_leaves_other_exceptions_alone() -> None:
    with pytest.raises(KeyError), _common.rpc_errors():
        raise KeyError("x")


def test_frame_error_to_exception() -> None:
    error = _common.FrameError("INVALID_ARGUMENT", "tensor 'a': bad shape").to_exception()

    assert type(error) is errors.InvalidArgumentError
    assert error.details == "tensor 'a': bad shape"
