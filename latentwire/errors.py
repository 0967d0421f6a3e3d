"""Errors with a fixed report: a gRPC status name for requests the server refuses (raised by
model-side code, which must not depend on gRPC), one line on stderr for commands that cannot run."""

from __future__ import annotations

import itertools


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


def show(value, limit: int = 64) -> str:
    """`repr(value)` cut to about `limit` characters: what a refusal may echo of a value a peer sent.

    A peer controls the size of what it sends (a 10 MB provenance string, a shape of a million
    dimensions, a map of nested arrays); a message echoing it whole would cost the server the
    formatting and send it all back in the status. Strings, sequences and maps are cut before `repr`
    (the items of a sequence or map shown the same way, two levels deep), so the cost is bounded as well.
    """
    return _show(value, limit, 2)


def _show(value, limit: int, depth: int) -> str:
    if isinstance(value, (str, bytes)):
        text, size, unit = repr(value[:limit]), len(value), "characters" if isinstance(value, str) else "bytes"
    elif isinstance(value, dict) or (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        text, size, unit = _items(value, limit, depth), len(value), "items"  # lists, tuples, protobuf repeated
    else:
        text = repr(value)
        size, unit = len(text), "characters"
    if size <= limit and len(text) <= 2 * limit:  # whole, and short (quotes and escapes may add a little)
        return text
    return f"{text[:limit]}... ({size} {unit})"


def _items(value, limit: int, depth: int) -> str:
    """A sequence or map written as repr writes a list or dict, from as many first items as fill the limit."""
    is_map = isinstance(value, dict)
    if depth == 0:
        return "{...}" if is_map else "[...]"
    parts, n = [], 0
    for item in itertools.islice(value.items() if is_map else value, limit):
        part = (f"{_show(item[0], limit, depth - 1)}: {_show(item[1], limit, depth - 1)}" if is_map
                else _show(item, limit, depth - 1))
        parts.append(part)
        n += len(part) + 2
        if n > 2 * limit:
            break
    return ("{%s}" if is_map else "[%s]") % ", ".join(parts)
