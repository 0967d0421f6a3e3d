"""gRPC client for LatentWire services behind a Serve gRPC proxy (one channel, reused)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from latentwire.settings import Limits, grpc_channel_options
from protos.latentwire.v1 import latentwire_pb2 as pb
from protos.latentwire.v1 import latentwire_pb2_grpc as pb_grpc
from services.packets import parse_mode


class LatentWireClient:
    """`with LatentWireClient("127.0.0.1:9000") as c: c.ask(context, question, mode="latent")`."""

    def __init__(self, address: str = "127.0.0.1:9000", *, source_app: str = "source",
                 timeout_s: float = 300.0, limits: Limits | None = None, token: str | None = None):
        self.address, self.source_app, self.timeout_s = address, source_app, timeout_s
        self.token = token
        self.channel = grpc.insecure_channel(address, options=grpc_channel_options(limits or Limits()))
        self.agent = pb_grpc.AgentServiceStub(self.channel)
        self.bridge = pb_grpc.BridgeServiceStub(self.channel)

    def metadata(self, app: str) -> tuple[tuple[str, str], ...]:
        meta = [("application", app)]
        if self.token:
            meta.append(("authorization", f"Bearer {self.token}"))
        return tuple(meta)

    @staticmethod
    def request(context: str, question: str, mode: str | int = "latent", max_new_tokens: int = 0,
                target_agent: str = "", request_id: str = "") -> pb.AskRequest:
        mode = parse_mode(mode) if isinstance(mode, str) else mode
        return pb.AskRequest(context=context, question=question, mode=mode, max_new_tokens=max_new_tokens,
                             target_agent=target_agent, request_id=request_id)

    def ask(self, context: str = "", question: str = "", mode: str | int = "latent", *,
            request: pb.AskRequest | None = None, timeout: float | None = None, **kw) -> pb.AskReply:
        req = request or self.request(context, question, mode, **kw)
        return self.agent.Ask(req, metadata=self.metadata(self.source_app), timeout=timeout or self.timeout_s)

    def ask_stream(self, context: str = "", question: str = "", mode: str | int = "latent", *,
                   request: pb.AskRequest | None = None, timeout: float | None = None, **kw) -> Iterator[pb.AskChunk]:
        req = request or self.request(context, question, mode, **kw)
        return self.agent.AskStream(req, metadata=self.metadata(self.source_app), timeout=timeout or self.timeout_s)

    def receive(self, request: pb.ReceiveRequest, app: str = "target", timeout: float | None = None) -> pb.ReceiveReply:
        return self.agent.Receive(request, metadata=self.metadata(app), timeout=timeout or self.timeout_s)

    def translate(self, packet: pb.HiddenStatePacket, app: str = "bridge",
                  timeout: float | None = None) -> pb.TranslateReply:
        return self.bridge.Translate(packet, metadata=self.metadata(app), timeout=timeout or self.timeout_s)

    def health(self, app: str, timeout: float = 10.0) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(), metadata=self.metadata(app), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "LatentWireClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
