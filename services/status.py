"""Turn refusals into gRPC statuses inside Serve deployments, so bad input never kills a replica.

Serve passes a `RayServegRPCContext` to methods that accept `grpc_context`; a code set on it is
what the client receives. Model-side code raises `LatentWireError` (which carries the code name);
a downstream gRPC failure keeps its code and names the hop.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import re

import grpc

from latentwire.errors import LatentWireError, Unimplemented
from services import metrics

log = logging.getLogger("latentwire.services")


class HopError(Exception):
    """A call to another service failed; `code` is its grpc.StatusCode."""

    def __init__(self, hop: str, err: grpc.RpcError):
        self.hop = hop
        self.code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNAVAILABLE
        details = err.details() if hasattr(err, "details") else str(err)
        if self.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and REPLICA_DIED.search(details or ""):
            # Serve's proxy reports a replica that died mid-request as INTERNAL; to our caller it
            # is a transient outage of that hop (Serve starts a new replica): UNAVAILABLE, retryable.
            self.code = grpc.StatusCode.UNAVAILABLE
            details = f"replica died mid-request, retry ({details})"
        super().__init__(f"{hop}: {details}")


# What Ray puts in the message of a call whose actor (replica) died or became unreachable.
REPLICA_DIED = re.compile(r"ActorDiedError|ActorUnavailableError|RayActorError|actor died|actor is dead|"
                           r"WorkerCrashedError|ActorUnschedulableError|OwnerDiedError", re.IGNORECASE)


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, LatentWireError):
        return getattr(grpc.StatusCode, exc.code), str(exc)
    if isinstance(exc, HopError):
        return exc.code, str(exc)
    log.exception("internal error")
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}: {exc}); see the replica log"


def _set(ctx, exc: Exception, method: str) -> None:
    code, details = _status(exc)
    if ctx is None:  # called directly (not through gRPC): surface the exception as is
        raise exc
    metrics.refusal(method, code, getattr(exc, "field", None) or getattr(exc, "hop", None))
    ctx.set_code(code)
    ctx.set_details(details)


def _authenticate(servicer, ctx, method: str) -> None:
    """Check that this application serves `method` and that the caller holds the credential it
    takes, when the servicer has an `auth` (services.auth.BearerAuth).

    Direct calls (ctx None: handles inside the cluster, unit tests) are not gRPC ingress calls.
    """
    auth = getattr(servicer, "auth", None)
    if auth is not None and ctx is not None:
        auth.check(method, ctx.invocation_metadata())


def wrong_app(method: str, where: str) -> Unimplemented:
    """The refusal of a method sent to an application that does not serve it: UNIMPLEMENTED, naming
    where it is served, rather than an internal error listing this replica's methods."""
    return Unimplemented(f"{method} is not served by this application; send it to {where} "
                         f"(gRPC metadata `application`)", "application")


class StreamFailed(Exception):
    """Ends a refused stream. Serve's proxy sends the context's code with each message only, so a
    stream that ends without one would reach the client as OK; an exception raised after the code
    is set makes Serve return exactly that code and details."""


def rpc(reply_type):
    """Decorate a unary (sync or async) or server-streaming (async generator) RPC method taking
    (self, request, grpc_context=None).

    Authentication runs first, inside the same try: a refused caller gets UNAUTHENTICATED (no valid
    token), PERMISSION_DENIED (the wrong one of the two tokens) or UNIMPLEMENTED (a method this
    application does not serve), and the method body never runs.
    """

    def wrap(fn):
        return metrics.track(_mapped(fn), fn.__name__)  # counted in flight, refusals included

    def _mapped(fn):
        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def astream(self, request, grpc_context=None):
                try:
                    _authenticate(self, grpc_context, fn.__name__)
                    # closed here, not whenever it is collected: a client that goes away (this
                    # generator closed or cancelled) reaches the method's own cleanup at once
                    async with contextlib.aclosing(fn(self, request, grpc_context)) as items:
                        async for item in items:
                            yield item
                except Exception as exc:  # noqa: BLE001
                    _set(grpc_context, exc, fn.__name__)
                    raise StreamFailed(str(exc)) from exc
            return astream

        if inspect.isgeneratorfunction(fn):  # would hold a thread of the replica for the whole stream
            raise TypeError(f"{fn.__name__}: a streaming RPC must be an async generator (see services.streaming)")

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def aunary(self, request, grpc_context=None):
                try:
                    _authenticate(self, grpc_context, fn.__name__)
                    return await fn(self, request, grpc_context)
                except Exception as exc:  # noqa: BLE001
                    _set(grpc_context, exc, fn.__name__)
                    return reply_type()
            return aunary

        @functools.wraps(fn)
        def unary(self, request, grpc_context=None):
            try:
                _authenticate(self, grpc_context, fn.__name__)
                return fn(self, request, grpc_context)
            except Exception as exc:  # noqa: BLE001
                _set(grpc_context, exc, fn.__name__)
                return reply_type()
        return unary

    return wrap
