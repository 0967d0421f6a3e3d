"""services.metrics: the hooks never fail a request, and a real local cluster exports the stage
metrics, per mode and target, and the refusals by status and field as Prometheus text on its
metrics export port after real gRPC requests."""

from __future__ import annotations

import re
import time
import urllib.request

import grpc
import pytest

from protos.latentwire.v1 import latentwire_pb2 as pb
from services import metrics
from tests.conftest import free_port

CONTEXT = "Alice keeps the red key in Lisbon."
QUESTION = "Where is the key?"


def test_the_stage_names_are_the_timings_fields():
    assert "bridge" in metrics.STAGES and "target_prefill" in metrics.STAGES
    assert "source_total" not in metrics.STAGES  # recorded as latentwire_request_ms
    assert metrics.BATCHES == ("source", "bridge", "target")


def test_a_metrics_failure_never_fails_a_request(monkeypatch, caplog):
    import grpc as g

    def broken():
        raise RuntimeError("no metrics agent")

    monkeypatch.setattr(metrics, "_metrics", None)
    monkeypatch.setattr(metrics, "_failed", False)
    monkeypatch.setattr(metrics, "_make", broken)
    reply = pb.AskReply(mode=pb.LATENT, packet_bytes=10)
    assert metrics.reply(reply) is reply
    metrics.refusal("Ask", g.StatusCode.INVALID_ARGUMENT, "question")  # no exception
    assert sum("recording metrics failed" in r.message for r in caplog.records) == 1  # logged once


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def samples(text: str, name: str, **tags) -> list[float]:
    """Values of the samples of metric `name` whose labels include `tags`."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in tags.items()):
            out.append(float(m.group(2)))
    return out


def in_bucket(text: str, name: str, value: float, **tags) -> bool:
    """The one observation of histogram `name` fell in the bucket of `value` (Ray exports `_sum`
    from bucket midpoints, so the buckets are the exact record)."""
    les = {}
    for line in text.splitlines():
        m = re.match(rf'^{re.escape(name)}_bucket\{{(.*)\}} (\S+)$', line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in tags.items()):
            le = re.search(r'le="([^"]+)"', m.group(1)).group(1)
            les[float(le)] = float(m.group(2))
    upper = min(le for le in les if le >= value)
    return les[upper] == 1.0 and all(c == 0.0 for le, c in les.items() if le < upper)


@pytest.mark.slow
def test_a_real_cluster_exports_stage_metrics_and_refusals(tiny_bridge_path):
    from services import local
    from services.client import LatentWireClient
    from tests.serve_cluster import start_ray, tiny_config

    port = free_port()
    cfg = tiny_config(tiny_bridge_path, free_port(), free_port())
    start_ray(_metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000})
    try:
        local.deploy(cfg)
        with LatentWireClient(local.grpc_address(cfg), timeout_s=60) as c:
            replies = {mode: c.ask(CONTEXT, QUESTION, mode, max_new_tokens=3) for mode in ("latent", "text", "none")}
            with pytest.raises(grpc.RpcError) as err:
                c.ask(CONTEXT, QUESTION, "latent", max_new_tokens=3, target_agent="nowhere")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

        def exported():
            text = scrape(port)
            return text if samples(text, "ray_latentwire_refusals_total", code="NOT_FOUND") else None

        deadline, text = time.monotonic() + 90, None
        while text is None and time.monotonic() < deadline:
            time.sleep(2)
            text = exported()
        assert text is not None, "latentwire metrics not exported after 90 s"
        assert samples(text, "ray_latentwire_refusals_total", method="Ask", code="NOT_FOUND",
                       field="target_agent", application="source") == [1.0]
        for mode in ("latent", "text", "none"):
            assert samples(text, "ray_latentwire_request_ms_count", mode=mode, target="default") == [1.0], mode
            assert samples(text, "ray_latentwire_stage_ms_count", mode=mode, stage="target_prefill") == [1.0], mode
            assert samples(text, "ray_latentwire_batch_size_count", mode=mode, stage="target") == [1.0], mode
        assert samples(text, "ray_latentwire_stage_ms_count", mode="latent", stage="bridge") == [1.0]
        assert not samples(text, "ray_latentwire_stage_ms_count", mode="none", stage="bridge")  # skipped stage
        for mode, reply in replies.items():  # the reply's own figures, as sent to the client, in their bucket
            assert in_bucket(text, "ray_latentwire_packet_bytes", reply.packet_bytes, mode=mode), mode
            assert in_bucket(text, "ray_latentwire_message_tokens", reply.message_tokens, mode=mode), mode
        assert replies["latent"].packet_bytes > 0 and replies["latent"].message_tokens > 0
        # every call has ended: each method that ran reports none in flight, on the app that served it
        assert samples(text, "ray_latentwire_in_flight", method="Ask", application="source") == [0.0]
        assert samples(text, "ray_latentwire_in_flight", method="Receive", application="target") == [0.0]
    finally:
        local.shutdown()


def test_the_dashboard_plots_every_exported_metric_and_nothing_else():
    """deploy/grafana-dashboard.json queries exactly the metrics services/metrics.py exports, so a
    metric renamed or added without its panel fails here rather than on an operator's screen."""
    import json
    from pathlib import Path

    dash = json.loads((Path(__file__).resolve().parent.parent / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count|total)$", "", m) for e in exprs for m in re.findall(r"ray_latentwire_\w+", e)}
    assert used == {"ray_" + name for name in metrics.NAMES.values()}
    assert all("histogram_quantile" in e or "_bucket" not in e for e in exprs)  # buckets only through quantiles


def test_a_call_is_counted_in_flight_while_it_runs_and_after_a_refusal_is_not():
    import asyncio

    from latentwire.errors import InvalidArgument
    from services.status import rpc

    seen = []

    class Servicer:
        @rpc(pb.AskReply)
        async def Ask(self, request, grpc_context=None):
            seen.append(metrics._serving["Ask"])
            if request.question == "bad":
                raise InvalidArgument("bad question", "question")
            return pb.AskReply(answer="ok")

        @rpc(pb.AskChunk)
        async def AskStream(self, request, grpc_context=None):
            yield pb.AskChunk(text=str(metrics._serving["AskStream"]))

    class Ctx:
        def set_code(self, code): pass
        def set_details(self, details): pass
        def invocation_metadata(self): return ()

    async def go():
        s = Servicer()
        assert (await s.Ask(pb.AskRequest(question="q"), Ctx())).answer == "ok"
        assert (await s.Ask(pb.AskRequest(question="bad"), Ctx())).answer == ""  # refused, counted out too
        return [c.text async for c in s.AskStream(pb.AskRequest(), Ctx())]

    assert asyncio.run(go()) == ["1"]
    assert seen == [1, 1] and metrics._serving["Ask"] == 0 and metrics._serving["AskStream"] == 0
