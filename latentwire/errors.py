"""Errors with a fixed report: a gRPC status name for requests the server refuses (raised by
model-side code, which must not depend on gRPC), one line on stderr for commands that cannot run."""

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


class PermissionDenied(LatentWireError):
    """An authenticated caller without the right to this call (a client's token on an internal hop,
    a latent packet without a valid bridge signature)."""

    code = "PERMISSION_DENIED"


class NotFound(LatentWireError):
    code = "NOT_FOUND"


class Unimplemented(LatentWireError):
    """A method this application does not serve (it belongs to another one behind the same proxy)."""

    code = "UNIMPLEMENTED"


class ConfigError(ValueError):
    """A command or job that cannot run as configured, found before any work starts. The CLI
    reports it as `latentwire COMMAND: error: MESSAGE` with exit status 2, like argparse."""
