"""The errors an operation answers with; ``kind`` is what the shim maps to an errdefs kind."""

from __future__ import annotations


class AgentError(Exception):
    kind = "unknown"


class NotFound(AgentError):
    kind = "not_found"


class InvalidArgument(AgentError):
    kind = "invalid_argument"


class FailedPrecondition(AgentError):
    kind = "failed_precondition"


class AlreadyExists(AgentError):
    kind = "already_exists"
