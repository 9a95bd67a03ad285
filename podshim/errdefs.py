"""containerd's error kinds and how they cross the ttrpc boundary.

Every error the shim raises on purpose is one of these classes, so the service layer maps
it to exactly one gRPC code.  containerd strips a trailing ``": <kind text>"`` from the
message and re-wraps it (spec §2.3), hence the suffixes.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """gRPC status codes (google.rpc.Code)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class ShimError(Exception):
    """An error with a gRPC code. Plain ``ShimError`` is Unknown, as runc-v2's unclassified errors are."""

    code: Code = Code.UNKNOWN
    suffix: str = ""

    def __init__(self, message: str) -> None:
        if self.suffix and not message.endswith(": " + self.suffix):
            message = f"{message}: {self.suffix}"
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidArgument(ShimError):
    code = Code.INVALID_ARGUMENT
    suffix = "invalid argument"


class NotFound(ShimError):
    code = Code.NOT_FOUND
    suffix = "not found"


class AlreadyExists(ShimError):
    code = Code.ALREADY_EXISTS
    suffix = "already exists"


class FailedPrecondition(ShimError):
    code = Code.FAILED_PRECONDITION
    suffix = "failed precondition"


class NotImplementedErr(ShimError):
    code = Code.UNIMPLEMENTED
    suffix = "not implemented"


class Unavailable(ShimError):
    code = Code.UNAVAILABLE
    suffix = "unavailable"


class DeadlineExceeded(ShimError):
    code = Code.DEADLINE_EXCEEDED


class ResourceExhausted(ShimError):
    code = Code.RESOURCE_EXHAUSTED


class Internal(ShimError):
    code = Code.INTERNAL
