"""Each snapshotter error reaches containerd as the gRPC code its errdefs expects."""

from __future__ import annotations

import grpc
import pytest

from snapshotter.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from snapshotter.filters import FilterSyntaxError
from snapshotter.service import status_code


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExistsError("x"), grpc.StatusCode.ALREADY_EXISTS),
        (FailedPreconditionError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (InvalidArgumentError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (FilterSyntaxError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (UnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
        (RuntimeError("x"), grpc.StatusCode.UNKNOWN),
    ],
)
def test_status_codes(exc: Exception, code: grpc.StatusCode) -> None:
    assert status_code(exc) is code
