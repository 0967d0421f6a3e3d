"""Packet building and checking, shared by all three services: a packet whose provenance (models, layer,
hidden sizes, bridge) does not match its receiver is refused with a status that names the field."""

from __future__ import annotations

import re
import uuid

from latentwire.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, show
from protos.latentwire.v1 import latentwire_pb2 as pb

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
__all__ = ["show"]  # latentwire.errors.show: every value a refusal echoes goes through it, cut short
MODES = {name.lower(): value for name, value in pb.Mode.items()}  # the proto's modes, by their lower-case names


def mode_name(mode: int) -> str:
    return pb.Mode.Name(mode).lower()


def parse_mode(name: str) -> int:
    try:
        return MODES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; use one of {', '.join(MODES)}") from None


def check_mode(mode: int, field: str = "mode") -> int:
    if mode not in pb.Mode.values():
        raise InvalidArgument(f"unknown mode {mode}; expected one of {', '.join(pb.Mode.keys())}", field)
    return mode


def request_id(rid: str) -> str:
    if not rid:
        return uuid.uuid4().hex
    if not _REQUEST_ID.match(rid):
        raise InvalidArgument(f"must be 1-128 characters of [A-Za-z0-9._:-], got {show(rid)}", "request_id")
    return rid


def check_question(question: str, max_chars: int) -> None:
    if len(question) > max_chars:  # first: strip() would copy an oversized question
        raise InvalidArgument(f"{len(question)} characters exceed the limit of {max_chars}", "question")
    if not question.strip():
        raise InvalidArgument("must not be empty", "question")


def check_chars(text: str, max_chars: int, field: str) -> None:
    """Refuse text longer than `max_chars` before it is tokenised: a tokenizer's time and memory grow
    with the characters, so a token limit checked after tokenising would come too late."""
    if len(text) > max_chars:
        raise ResourceExhausted(f"{len(text)} characters exceed the configured limit of {max_chars} "
                                f"(max_context_chars)", field)


def check_session_id(sid: str, field: str = "session_id") -> str:
    """A session id is a key the replicas keep and route by (gRPC metadata): short and plain."""
    if sid and not _REQUEST_ID.match(sid):
        raise InvalidArgument(f"must be 1-128 characters of [A-Za-z0-9._:-], got {show(sid)}", field)
    return sid


def check_new_tokens(n: int, default: int, maximum: int) -> int:
    if n == 0:
        return default
    if not 1 <= n <= maximum:
        raise InvalidArgument(f"must be in 1..{maximum} (0 for the default {default}), got {n}", "max_new_tokens")
    return n


def expect(field: str, got, want, what: str) -> None:
    """Refuse a packet whose provenance does not match the receiver."""
    if got != want:
        raise FailedPrecondition(f"packet {what} is {show(got)}, this receiver expects {show(want)}", field)
