"""Prometheus metrics of the services: the stages an operator of latent-space agents watches.

Ray Serve counts requests per deployment; these add, per mode and target agent, what one request
cost at each stage of `pb.Timings`, the bytes on the wire, the message size and the batch sizes, and
every refusal by gRPC status and field. They use Serve's metrics API (`ray.serve.metrics`: inside a
replica it adds the application, deployment and replica tags), and each node's metrics agent exports
them as Prometheus text on the node's metrics export port with Ray's `ray_` prefix
(`ray_latentwire_stage_ms_bucket{...}`; docs/deploy.md, "Metrics").

Three hooks feed them: `reply` at the end of the source's `_ask` (every answered Ask and AskStream),
`refusal` in `services.status` (every non-OK status an RPC returns) and `tracked`, which `@rpc` wraps
around every method so that each replica reports the calls it is serving now, per method. All are
cheap (a few observes) and never raise: a metrics failure is logged once and the request goes on.
The Grafana dashboard `deploy/grafana-dashboard.json` plots every one of them.
"""

from __future__ import annotations

import collections
import contextlib
import logging

from protos.latentwire.v1 import latentwire_pb2 as pb

log = logging.getLogger("latentwire.services")

PREFIX = "latentwire_"
# the per-stage durations of pb.Timings; source_total_ms is the end-to-end latency inside the source
STAGES = tuple(f.name[:-3] for f in pb.Timings.DESCRIPTOR.fields if f.name.endswith("_ms") and f.name != "source_total_ms")
BATCHES = tuple(f.name[:-6] for f in pb.Timings.DESCRIPTOR.fields if f.name.endswith("_batch"))
MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 60000, 180000]
BYTE_BOUNDARIES = [2**k for k in range(8, 28, 2)]  # 256 B .. 128 MiB, by 4x
TOKEN_BOUNDARIES = [2**k for k in range(14)]  # 1 .. 8192
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]

# every metric the services export (Prometheus adds Ray's `ray_` prefix; a counter gains `_total`)
NAMES = {key: PREFIX + name for key, name in [
    ("request", "request_ms"), ("stage", "stage_ms"), ("bytes", "packet_bytes"), ("tokens", "message_tokens"),
    ("batch", "batch_size"), ("refusals", "refusals"), ("in_flight", "in_flight")]}

_metrics: dict | None = None
_failed = False
_serving: collections.Counter = collections.Counter()  # method -> calls in flight in this process


def _make() -> dict:
    from ray.serve.metrics import Counter, Gauge, Histogram

    req = ("mode", "target")
    return {
        "request": Histogram(NAMES["request"], description="End-to-end latency of an Ask inside the source agent (ms)",
                             boundaries=MS_BOUNDARIES, tag_keys=req),
        "stage": Histogram(NAMES["stage"], description="Latency of one stage of an Ask (pb.Timings, ms); "
                           "stages the mode skips are not recorded",
                           boundaries=MS_BOUNDARIES, tag_keys=req + ("stage",)),
        "bytes": Histogram(NAMES["bytes"], description="Bytes of the packets one Ask put on the wire",
                           boundaries=BYTE_BOUNDARIES, tag_keys=req),
        "tokens": Histogram(NAMES["tokens"], description="Tokens (or soft tokens) of the message one Ask sent",
                            boundaries=TOKEN_BOUNDARIES, tag_keys=req),
        "batch": Histogram(NAMES["batch"], description="Requests batched with an Ask at each stage",
                           boundaries=BATCH_BOUNDARIES, tag_keys=req + ("stage",)),
        "refusals": Counter(NAMES["refusals"], description="RPCs answered with a non-OK status, by status and field",
                            tag_keys=("method", "code", "field")),
        "in_flight": Gauge(NAMES["in_flight"], description="RPCs this replica is serving now, by method",
                           tag_keys=("method",)),
    }


def _get() -> dict | None:
    global _metrics
    if _metrics is None:
        _metrics = _make()  # in the replica's own process: Ray's metric objects are per process
    return _metrics


def _failure() -> None:
    global _failed
    if not _failed:
        _failed = True
        log.exception("recording metrics failed; requests go on without them")


def reply(r: pb.AskReply) -> pb.AskReply:
    """Record an answered Ask; returns `r` so that the hook is one expression."""
    try:
        m = _get()
        tags = {"mode": pb.Mode.Name(r.mode).lower(), "target": r.target_agent or "default"}
        t = r.timings
        m["request"].observe(t.source_total_ms, tags)
        for stage in STAGES:
            ms = getattr(t, stage + "_ms")
            if ms > 0:
                m["stage"].observe(ms, {**tags, "stage": stage})
        for stage in BATCHES:
            n = getattr(t, stage + "_batch")
            if n > 0:
                m["batch"].observe(n, {**tags, "stage": stage})
        m["bytes"].observe(r.packet_bytes, tags)
        m["tokens"].observe(r.message_tokens, tags)
    except Exception:  # noqa: BLE001 - metrics never fail a request
        _failure()
    return r


def refusal(method: str, code, field: str | None) -> None:
    """Count one RPC answered with status `code` (a grpc.StatusCode); `field` names the culprit."""
    try:
        _get()["refusals"].inc(1, {"method": method, "code": code.name, "field": (field or "")[:64]})
    except Exception:  # noqa: BLE001 - metrics never fail a request
        _failure()


def _in_flight(method: str, delta: int) -> None:
    try:
        _serving[method] += delta  # on the replica's event loop (or the caller's thread): no lock needed
        _get()["in_flight"].set(_serving[method], {"method": method})
    except Exception:  # noqa: BLE001 - metrics never fail a request
        _failure()


@contextlib.contextmanager
def tracked(method: str):
    """Count one call of `method` in flight for as long as the block runs."""
    _in_flight(method, +1)
    try:
        yield
    finally:
        _in_flight(method, -1)


def track(fn, method: str):
    """`fn` (an RPC wrapper of services.status.rpc: async generator, coroutine or plain function
    taking (self, request, grpc_context)) counted in flight while it runs."""
    import functools
    import inspect

    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def astream(self, request, grpc_context=None):
            with tracked(method):  # closed with this stream, so the method's cleanup runs at once
                async with contextlib.aclosing(fn(self, request, grpc_context)) as items:
                    async for item in items:
                        yield item
        return astream
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def aunary(self, request, grpc_context=None):
            with tracked(method):
                return await fn(self, request, grpc_context)
        return aunary
    @functools.wraps(fn)
    def unary(self, request, grpc_context=None):
        with tracked(method):
            return fn(self, request, grpc_context)
    return unary
