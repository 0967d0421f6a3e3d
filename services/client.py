"""gRPC client for LatentWire services behind a Serve gRPC proxy (one channel, reused).

Retries: every call is idempotent (Receive/Translate are pure functions of the request; Ask is
deduplicated by request id on the source agent, and the client fills in a request id when the
caller gave none), so a call that fails with UNAVAILABLE (a replica died or is restarting, the
proxy is not up yet) or with Serve's backpressure RESOURCE_EXHAUSTED is retried with
exponential backoff and jitter, within one overall deadline: the call never outlives `timeout`,
and when it runs out the caller sees the last status (UNAVAILABLE) or DEADLINE_EXCEEDED. A stream
is retried the same way, also after it started: the retry's repeated text is not passed on twice.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from latentwire.settings import AuthSettings, Limits, grpc_channel_options
from protos.latentwire.v1 import latentwire_pb2 as pb
from protos.latentwire.v1 import latentwire_pb2_grpc as pb_grpc
from services.packets import parse_mode


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: try n waits uniform(0, min(max, initial * mult**n))."""

    attempts: int = 6  # tries in all, the first included; 1 disables retries
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    multiplier: float = 2.0

    def backoff(self, attempt: int, rng: random.Random = random) -> float:
        return rng.uniform(0, min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** attempt))


NO_RETRY = RetryPolicy(attempts=1)


def retryable(err: grpc.RpcError) -> bool:
    """UNAVAILABLE; RESOURCE_EXHAUSTED from Serve's request queue (not one of our input limits); and
    the INTERNAL that Serve's proxy returns when the replica serving the call died (Serve replaces it)."""
    from services.status import REPLICA_DIED

    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code == grpc.StatusCode.INTERNAL:
        return bool(REPLICA_DIED.search(details))
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and "backpressure" in details


def call_with_retries(call: Callable[[float], object], timeout: float, policy: RetryPolicy,
                      sleep: Callable[[float], None] = time.sleep,
                      on_retry: Callable[[grpc.RpcError], None] | None = None) -> object:
    """`call(remaining_s)` until it succeeds, fails with a non-retryable status, or time runs out."""
    deadline = time.monotonic() + timeout
    for attempt in range(policy.attempts):
        try:
            return call(max(deadline - time.monotonic(), 0.001))
        except grpc.RpcError as err:
            pause = policy.backoff(attempt)
            if not retryable(err) or attempt == policy.attempts - 1 or time.monotonic() + pause >= deadline:
                raise
            if on_retry is not None:
                on_retry(err)
            sleep(pause)
    raise AssertionError("unreachable")  # pragma: no cover


class StreamDiverged(grpc.RpcError):
    """A retried stream's text differs from the text the caller already has (ABORTED, not retried)."""

    def __init__(self, sent: str, got: str):
        super().__init__()
        self._details = (f"a retried stream answered differently from the stream it replaces "
                         f"({sent[:80]!r} then {got[:80]!r})")

    def code(self):
        return grpc.StatusCode.ABORTED

    def details(self):
        return self._details

    def __str__(self):
        return self._details


class LatentWireClient:
    """`with LatentWireClient("127.0.0.1:9000") as c: c.ask(context, question, mode="latent")`."""

    def __init__(self, address: str = "127.0.0.1:9000", *, source_app: str = "source",
                 timeout_s: float = 300.0, limits: Limits | None = None, token: str | None = None,
                 retry: RetryPolicy = RetryPolicy(), tls: bool = False, root_certificates: bytes | None = None):
        self.address, self.source_app, self.timeout_s, self.retry = address, source_app, timeout_s, retry
        # the bearer token: given, or the one the services read (LATENTWIRE_AUTH_TOKEN by default)
        self.retries = 0  # retried attempts so far (all calls of this client)
        self.stream_resumes = 0  # of which: streams retried after some of their text reached the caller
        self._count_lock = threading.Lock()
        self.token = token if token is not None else os.environ.get(AuthSettings().token_env) or None
        options = grpc_channel_options(limits or Limits())
        # TLS ends at the ingress in front of the Serve proxy (which speaks plaintext gRPC only)
        self.channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates), options=options)
                        if tls else grpc.insecure_channel(address, options=options))
        self.agent = pb_grpc.AgentServiceStub(self.channel)
        self.bridge = pb_grpc.BridgeServiceStub(self.channel)

    def metadata(self, app: str) -> tuple[tuple[str, str], ...]:
        meta = [("application", app)]
        if self.token:
            meta.append(("authorization", f"Bearer {self.token}"))
        return tuple(meta)

    @staticmethod
    def request(context: str, question: str, mode: str | int = "latent", max_new_tokens: int = 0,
                target_agent: str = "", request_id: str = "", message_tokens: int = 0) -> pb.AskRequest:
        mode = parse_mode(mode) if isinstance(mode, str) else mode
        return pb.AskRequest(context=context, question=question, mode=mode, max_new_tokens=max_new_tokens,
                             target_agent=target_agent, request_id=request_id, message_tokens=message_tokens)

    def _unary(self, method, request, app: str, timeout: float | None):
        meta = self.metadata(app)
        return call_with_retries(lambda left: method(request, metadata=meta, timeout=left),
                                 timeout or self.timeout_s, self.retry, on_retry=self._count_retry)

    def _count_retry(self, err: grpc.RpcError) -> None:
        with self._count_lock:
            self.retries += 1

    @staticmethod
    def _with_id(req: pb.AskRequest) -> pb.AskRequest:
        """A retry must reach the source with the same request id, so the client picks one if needed."""
        if req.request_id:
            return req
        out = pb.AskRequest()
        out.CopyFrom(req)
        out.request_id = uuid.uuid4().hex
        return out

    def ask(self, context: str = "", question: str = "", mode: str | int = "latent", *,
            request: pb.AskRequest | None = None, timeout: float | None = None, **kw) -> pb.AskReply:
        req = self._with_id(request or self.request(context, question, mode, **kw))
        return self._unary(self.agent.Ask, req, self.source_app, timeout)

    def ask_stream(self, context: str = "", question: str = "", mode: str | int = "latent", *,
                   request: pb.AskRequest | None = None, timeout: float | None = None, **kw) -> Iterator[pb.AskChunk]:
        """Stream an answer, retried like `ask` even after it started (a replica died mid-stream).

        A retry asks again with the same request (and request id) from the start; the answer is a
        pure function of the request (greedy decoding), so the retried stream repeats the text already
        passed to the caller, which is skipped: the caller sees each piece of the answer once, then
        the final reply. Should a retry's text ever differ from what was passed on (a changed model),
        the stream fails with ABORTED rather than splice two answers."""
        req = self._with_id(request or self.request(context, question, mode, **kw))
        meta, total = self.metadata(self.source_app), timeout or self.timeout_s
        deadline = time.monotonic() + total
        sent = ""  # the text passed to the caller so far, over all attempts
        for attempt in range(self.retry.attempts):
            stream = self.agent.AskStream(req, metadata=meta, timeout=max(deadline - time.monotonic(), 0.001))
            got = ""  # this attempt's text
            try:
                for chunk in stream:
                    if chunk.HasField("reply"):
                        yield chunk
                        continue
                    got += chunk.text
                    if not (got.startswith(sent) or sent.startswith(got)):
                        raise StreamDiverged(sent, got)
                    if len(got) > len(sent):
                        piece, sent = got[len(sent):], got
                        yield pb.AskChunk(text=piece)
                return
            except grpc.RpcError as err:
                pause = self.retry.backoff(attempt)
                if (not retryable(err) or attempt == self.retry.attempts - 1
                        or time.monotonic() + pause >= deadline):
                    raise
                self._count_retry(err)
                if sent:
                    with self._count_lock:
                        self.stream_resumes += 1
                time.sleep(pause)
            finally:
                stream.cancel()

    def receive(self, request: pb.ReceiveRequest, app: str = "target", timeout: float | None = None) -> pb.ReceiveReply:
        return self._unary(self.agent.Receive, request, app, timeout)

    def translate(self, packet: pb.HiddenStatePacket, app: str = "bridge",
                  timeout: float | None = None) -> pb.TranslateReply:
        return self._unary(self.bridge.Translate, packet, app, timeout)

    def health(self, app: str, timeout: float = 10.0) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = self._unary(stub.Check, health_pb2.HealthCheckRequest(), app, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "LatentWireClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
