"""Errors that carry a gRPC status name, raised by model-side code (which must not depend on gRPC)."""

from __future__ import annotations


class LatentWireError(Exception):
    """A request the server refuses. `code` is a grpc.StatusCode name; `field` names the culprit."""

    code = "INTERNAL"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class InvalidArgument(LatentWireError):
    code = "INVALID_ARGUMENT"


class FailedPrecondition(LatentWireError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(LatentWireError):
    code = "RESOURCE_EXHAUSTED"


class NotFound(LatentWireError):
    code = "NOT_FOUND"
