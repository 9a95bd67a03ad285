"""How errors cross the ttrpc boundary in both directions.

Server side: :func:`status_of` turns a handler's exception into a (code, message) pair.
Client side: :class:`TtrpcError` turns a non-OK status back into an exception that is also
the matching :mod:`podshim.errdefs` kind, so ``except NotFound`` works on a remote error.
"""

from __future__ import annotations

import asyncio

from podshim import errdefs
from podshim.errdefs import Code, ShimError

# Go's context.DeadlineExceeded / context.Canceled text, which containerd may match on.
DEADLINE_MESSAGE = "context deadline exceeded"
CANCELED_MESSAGE = "context canceled"
CLOSED_MESSAGE = "ttrpc: closed"


def status_of(exc: BaseException) -> tuple[Code, str]:
    if isinstance(exc, ShimError):
        return exc.code, exc.message
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError since 3.11
        return Code.DEADLINE_EXCEEDED, str(exc) or DEADLINE_MESSAGE
    if isinstance(exc, asyncio.CancelledError):
        return Code.CANCELLED, CANCELED_MESSAGE
    return Code.UNKNOWN, str(exc)


class TtrpcError(ShimError):
    """A non-OK status from the peer.

    ``TtrpcError(code, message)`` returns an instance of the subclass that also derives
    from the errdefs kind for ``code`` (when there is one), e.g. :class:`RemoteNotFound`.
    The message is kept verbatim: the peer already added any ``": not found"`` suffix.
    """

    def __new__(cls, code: Code | int, message: str) -> TtrpcError:
        target = _BY_CODE.get(int(code), cls) if cls is TtrpcError else cls
        return Exception.__new__(target, code, message)

    def __init__(self, code: Code | int, message: str) -> None:
        Exception.__init__(self, message)  # not ShimError's: no suffix is added
        self.raw_code = int(code)
        try:
            self.code = Code(code)
        except ValueError:
            self.code = Code.UNKNOWN

    def __reduce__(self) -> tuple[object, ...]:
        return (TtrpcError, (self.raw_code, self.message))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"


class RemoteInvalidArgument(TtrpcError, errdefs.InvalidArgument):
    pass


class RemoteNotFound(TtrpcError, errdefs.NotFound):
    pass


class RemoteAlreadyExists(TtrpcError, errdefs.AlreadyExists):
    pass


class RemoteFailedPrecondition(TtrpcError, errdefs.FailedPrecondition):
    pass


class RemoteNotImplemented(TtrpcError, errdefs.NotImplementedErr):
    pass


class RemoteUnavailable(TtrpcError, errdefs.Unavailable):
    pass


class RemoteDeadlineExceeded(TtrpcError, errdefs.DeadlineExceeded):
    pass


class RemoteResourceExhausted(TtrpcError, errdefs.ResourceExhausted):
    pass


class RemoteInternal(TtrpcError, errdefs.Internal):
    pass


class TtrpcClosed(RemoteUnavailable):
    """The connection is gone; pending and later calls fail with this."""

    def __new__(cls, message: str = CLOSED_MESSAGE) -> TtrpcClosed:
        return Exception.__new__(cls, message)

    def __init__(self, message: str = CLOSED_MESSAGE) -> None:
        super().__init__(Code.UNAVAILABLE, message)

    def __reduce__(self) -> tuple[object, ...]:
        return (TtrpcClosed, (self.message,))


_BY_CODE: dict[int, type[TtrpcError]] = {
    Code.INVALID_ARGUMENT: RemoteInvalidArgument,
    Code.NOT_FOUND: RemoteNotFound,
    Code.ALREADY_EXISTS: RemoteAlreadyExists,
    Code.FAILED_PRECONDITION: RemoteFailedPrecondition,
    Code.UNIMPLEMENTED: RemoteNotImplemented,
    Code.UNAVAILABLE: RemoteUnavailable,
    Code.DEADLINE_EXCEEDED: RemoteDeadlineExceeded,
    Code.RESOURCE_EXHAUSTED: RemoteResourceExhausted,
    Code.INTERNAL: RemoteInternal,
}
