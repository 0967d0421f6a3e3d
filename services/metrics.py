"""Prometheus metrics of the services: the stages an operator of latent-space agents watches.

Ray Serve counts requests per deployment; these add, per mode and target agent, what one request
cost at each stage of `pb.Timings`, the bytes on the wire, the message size and the batch sizes, and
every refusal by gRPC status and field. They use Serve's metrics API (`ray.serve.metrics`: inside a
replica it adds the application, deployment and replica tags), and each node's metrics agent exports
them as Prometheus text on the node's metrics export port with Ray's `ray_` prefix
(`ray_latentwire_stage_ms_bucket{...}`; docs/deploy.md, "Metrics").

Two hooks feed them: `reply` at the end of the source's `_ask` (every answered Ask and AskStream) and
`refusal` in `services.status` (every non-OK status an RPC returns). Both are cheap (a few observes)
and never raise: a metrics failure is logged once and the request goes on.
"""

from __future__ import annotations

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

_metrics: dict | None = None
_failed = False


def _make() -> dict:
    from ray.serve.metrics import Counter, Histogram

    req = ("mode", "target")
    return {
        "request": Histogram(PREFIX + "request_ms", description="End-to-end latency of an Ask inside the source agent (ms)",
                             boundaries=MS_BOUNDARIES, tag_keys=req),
        "stage": Histogram(PREFIX + "stage_ms", description="Latency of one stage of an Ask (pb.Timings, ms); "
                           "stages the mode skips are not recorded",
                           boundaries=MS_BOUNDARIES, tag_keys=req + ("stage",)),
        "bytes": Histogram(PREFIX + "packet_bytes", description="Bytes of the packets one Ask put on the wire",
                           boundaries=BYTE_BOUNDARIES, tag_keys=req),
        "tokens": Histogram(PREFIX + "message_tokens", description="Tokens (or soft tokens) of the message one Ask sent",
                            boundaries=TOKEN_BOUNDARIES, tag_keys=req),
        "batch": Histogram(PREFIX + "batch_size", description="Requests batched with an Ask at each stage",
                           boundaries=BATCH_BOUNDARIES, tag_keys=req + ("stage",)),
        "refusals": Counter(PREFIX + "refusals", description="RPCs answered with a non-OK status, by status and field",
                            tag_keys=("method", "code", "field")),
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
