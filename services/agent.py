"""The agent servicer: one model actor that answers packets and, as a source, orchestrates a request.

Plain class (no Ray): `services.app` wraps it as a Serve deployment. gRPC methods are named
after the RPCs of `AgentService` and the standard health service, as Serve's gRPC proxy requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import collections
import functools
from collections.abc import AsyncIterator

import grpc
import torch

from latentwire import codec, merging, selection  # noqa: F401  (merging registers the `merge` selector)
from latentwire.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from latentwire.runtime import AgentModel, now_ms
from latentwire.sessions import SessionCaches, Sessions, TurnLog, check_turn
from latentwire.settings import AgentSettings, grpc_channel_options
from protos.latentwire.v1 import latentwire_pb2 as pb
from protos.latentwire.v1 import latentwire_pb2_grpc as pb_grpc
from services import metrics, packets, signing, streaming
from services.auth import BearerAuth, refusals
from services.batching import Batcher
from services.status import HopError, log, rpc


class AgentServicer(refusals("source", pb.DESCRIPTOR.services_by_name["BridgeService"])):
    """AgentService and health; Translate routed here is refused UNIMPLEMENTED (`services.auth.refusals`)."""

    def __init__(self, settings: dict | AgentSettings):
        self.settings = s = AgentSettings.model_validate(settings)
        if s.threads:
            torch.set_num_threads(s.threads)
        cache_factory = None
        if s.kv_compression is not None and s.kv_compression.method != "dense":
            from compression.session import factory

            cache_factory = factory(profile=s.profile, **s.kv_compression.model_dump())
        self.model = AgentModel(s.profile, device=s.device, dtype=s.dtype, limits=s.limits,
                                local_path=s.local_path, cache_factory=cache_factory,
                                batch_tokens=s.max_batch_tokens, prefill_dtype=s.prefill_dtype)
        if cache_factory is not None and s.kv_compression.select != "window":  # its repeat prompt needs the tokenizer
            self.model.engine.cache_factory = cache_factory = functools.partial(cache_factory, tokenizer=self.model.tok)
        if cache_factory is not None:  # a window the sidecar cannot compress: refuse the deployment, not each request
            cache_factory(self.model.model)
        self.limits = s.limits
        # checked by @rpc (which methods this role serves, with which token); its internal token goes
        # on the calls below and its key checks the bridge's signature on latent packets
        self.auth = BearerAuth.of(s)
        self.layer = s.source_layer or self.model.profile.source_layer
        # a layer the model lacks would fail every latent request; refuse the deployment instead
        for name, layer in [("source_layer", self.layer)] + [
                (f"targets.{k}.source_layer", r.source_layer) for k, r in s.targets.items() if r.source_layer]:
            self.model.check_layer(layer, name)
        self._channel = None
        # request id -> (request bytes, reply): retries are answered once (touched on the event loop only)
        self._replies: collections.OrderedDict[str, tuple[bytes, pb.AskReply]] = collections.OrderedDict()
        self.selector = selection.make_selector(s.selection.method, **s.selection.params)
        if self.selector.needs_attention_layer is not None:
            self.model.check_layer(self.selector.needs_attention_layer, "selection.params.needs_attention_layer")
        # Concurrent requests share one forward (services.batching): the target's answers, the
        # source's budgeted messages (LATENT states, EXTRACT tokens) and its TEXT messages
        self.answers, self.plans, self.messages = (
            Batcher(fn, s.max_batch_size, s.batch_wait_timeout_s)
            for fn in (self.model.answer_batch, lambda jobs: selection.plan_messages(self.model, jobs, self.selector),
                       self.model.write_messages))
        # Sessions (latentwire.sessions): as a target, each session's KV cache; as a source, each
        # session's turn log, replayed to rebuild a session its target lost
        self.sessions = SessionCaches(s.sessions)
        self.session_logs = Sessions(s.sessions)

    async def hold_session(self, session_id: str) -> str:
        """Called before each session turn this replica answers. Served (services.app), it is Serve's
        multiplexed loader: the replica then reports the session id, and the router sends the
        session's later turns (gRPC metadata `multiplexed_model_id`) here."""
        return session_id

    # ---- health (grpc.health.v1.Health/Check) ----------------------------------------------------
    def Check(self, request, grpc_context=None):
        from grpc_health.v1 import health_pb2

        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def stream_stats(self) -> dict[str, int]:
        """Counts of this replica's streamed generations (services.streaming.Stats): how many ran,
        finished, were stopped because their client went away, and are running now. Not an RPC:
        reached through a Serve handle (operators, tests)."""
        return streaming.STATS.snapshot()

    # ---- receiving side (target) -------------------------------------------------------------
    @rpc(pb.ReceiveReply)
    async def Receive(self, request: pb.ReceiveRequest, grpc_context=None) -> pb.ReceiveReply:
        t0 = now_ms()
        payload, max_new = await self._check_receive(request)
        t1 = now_ms()
        if request.session_id:  # a session's turn: alone, from and into its own cache
            await self.hold_session(request.session_id)
            gen, batch = await asyncio.to_thread(self._session_turn, request, payload, max_new), 1
        else:
            gen, batch = await self.answers.submit((payload, request.question, max_new))
        return self._receive_reply(request, gen, t0, t1, batch)

    @rpc(pb.ReceiveChunk)
    async def ReceiveStream(self, request: pb.ReceiveRequest, grpc_context=None) -> AsyncIterator[pb.ReceiveChunk]:
        """Receive, its answer streamed as it is decoded. The generation runs alone in a worker thread
        (the batched forward streams nothing); a client that goes away stops it at its next token."""
        t0 = now_ms()
        payload, max_new = await self._check_receive(request)
        t1 = now_ms()
        if request.session_id:
            await self.hold_session(request.session_id)
            run = functools.partial(self._session_turn, request, payload, max_new)
        else:
            run = functools.partial(self.model.answer, payload, request.question, max_new)
        async with contextlib.aclosing(streaming.run(run)) as items:  # closed with this stream: stops the thread
            async for item in items:
                if isinstance(item, str):
                    yield pb.ReceiveChunk(text=item)
                else:
                    yield pb.ReceiveChunk(reply=self._receive_reply(request, item, t0, t1))

    async def _check_receive(self, req: pb.ReceiveRequest):
        """The request checked, and its payload decoded or tokenised off the event loop; sizes are
        checked first, from the message as it came, before any of that work."""
        packets.check_question(req.question, self.limits.max_question_chars)
        max_new = packets.check_new_tokens(req.max_new_tokens, self.limits.default_new_tokens,
                                           self.limits.max_new_tokens)
        packets.check_session_id(req.session_id)
        if req.WhichOneof("payload") == "text":
            packets.check_chars(req.text.text, self.limits.max_context_chars, "text.text")
        return await asyncio.to_thread(self._payload, req), max_new

    def _session_turn(self, req: pb.ReceiveRequest, payload, max_new: int, emit=None):
        gen, _ = self.sessions.answer(self.model, req.session_id, req.session_turn, payload, req.question,
                                      max_new, on_token=emit)
        return gen

    def _receive_reply(self, req: pb.ReceiveRequest, gen, t0: float, t1: float, batch: int = 1) -> pb.ReceiveReply:
        return pb.ReceiveReply(request_id=req.request_id, answer=gen.text, answer_tokens=len(gen.token_ids),
                               packet_decode_ms=t1 - t0, prefill_ms=gen.prefill_ms, decode_ms=gen.decode_ms,
                               total_ms=now_ms() - t0, target_model=self.model.name,
                               kv_cache_tokens=gen.cache_tokens, batch_size=batch, session_id=req.session_id,
                               session_turns=req.session_turn + 1 if req.session_id else 0)

    def _payload(self, req: pb.ReceiveRequest):
        mode, which = packets.check_mode(req.mode), req.WhichOneof("payload")
        want = {pb.LATENT: "latent", pb.TEXT: "text", pb.EXTRACT: "text", pb.DIRECT: "text", pb.NONE: None}[mode]
        if which != want:
            raise InvalidArgument(f"mode {packets.mode_name(mode).upper()} needs payload "
                                  f"{want or 'none'}, got {which or 'none'}", "payload")
        if mode == pb.LATENT:
            return self._soft_tokens(req.latent)
        if mode in (pb.TEXT, pb.EXTRACT, pb.DIRECT):
            ids = self.model.tokenize(req.text.text)  # tokenised once: counted here, embedded later
            if len(ids) > self.limits.max_context_tokens:
                raise ResourceExhausted(f"{len(ids)} tokens exceed the configured limit of "
                                        f"{self.limits.max_context_tokens} (max_context_tokens)", "text.text")
            return ids
        return None

    def _soft_tokens(self, packet: pb.LatentPacket) -> torch.Tensor:
        p = packet.provenance
        packets.expect("latent.provenance.target_model", p.target_model, self.model.name, "target model")
        packets.expect("latent.provenance.target_hidden_size", p.target_hidden_size, self.model.hidden_size,
                       "target hidden size")
        accepted = self.settings.accepted_bridges
        if accepted and p.bridge_id not in accepted:
            packets.expect("latent.provenance.bridge_id", p.bridge_id, accepted[0] if len(accepted) == 1
                           else accepted, "bridge id")
        cap = min(self.limits.max_packet_tokens, self.limits.max_message_tokens)  # the message budget's ceiling
        rows = packet.soft_tokens.shape[0] if packet.soft_tokens.shape else 0
        if rows > cap:  # from the shape as sent, before decoding allocates anything
            raise ResourceExhausted(f"{rows} soft tokens exceed the limit of {cap} "
                                    f"(max_message_tokens)", "latent.soft_tokens.shape")
        signing.verify(packet, self.auth.packet_key)  # before the soft tokens reach the model
        if self.settings.accepted_bridge_sha256 and p.bridge_sha256 not in self.settings.accepted_bridge_sha256:
            raise FailedPrecondition(f"packet bridge weights {packets.show(p.bridge_sha256)} are not among the "
                                     "accepted ones (accepted_bridge_sha256)", "latent.provenance.bridge_sha256")
        return codec.decode(packet.soft_tokens, field="latent.soft_tokens", ndim=2,
                            last_dim=self.model.hidden_size, max_elements=self.limits.max_packet_elements)

    # ---- asking side (source) ----------------------------------------------------------------
    @rpc(pb.AskReply)
    async def Ask(self, request: pb.AskRequest, grpc_context=None) -> pb.AskReply:
        key = request.request_id and request.SerializeToString(deterministic=True)
        hit = self._replies.get(request.request_id) if key else None
        if hit is not None and hit[0] == key:  # a retried request id gets the reply it already had
            return hit[1]
        reply = await self._ask(request, None)
        if key:
            self._replies[request.request_id] = (key, reply)
            while len(self._replies) > 1024:
                self._replies.popitem(last=False)
        return reply

    @rpc(pb.AskChunk)
    async def AskStream(self, request: pb.AskRequest, grpc_context=None) -> AsyncIterator[pb.AskChunk]:
        """Ask, the target's answer streamed through. A client that goes away cancels the request:
        its call to the target ends, and the target's stream stops its generation in turn."""
        async with contextlib.aclosing(streaming.relay(lambda emit: self._ask(request, emit))) as items:
            async for item in items:
                yield pb.AskChunk(text=item) if isinstance(item, str) else pb.AskChunk(reply=item)

    def _stubs(self):
        # One aio channel per replica, created on the replica's event loop and reused by every request.
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.settings.grpc_address,
                                                      options=grpc_channel_options(self.limits))
            self._agent_stub = pb_grpc.AgentServiceStub(self._channel)
            self._bridge_stub = pb_grpc.BridgeServiceStub(self._channel)
        return self._agent_stub, self._bridge_stub

    def _route(self, target_agent: str):
        """The (name, route) of a target agent this source knows; "" is the default one."""
        name = target_agent or "default"
        route = self.settings.targets.get(name)
        if route is None:
            raise NotFound(f"unknown agent {packets.show(name)}; this source knows {sorted(self.settings.targets)}",
                           "target_agent")
        return name, route

    async def _deliver(self, out: pb.ReceiveRequest, name: str, route, emit, meta=()) -> pb.ReceiveReply:
        """The target's reply to `out`: its Receive, or its ReceiveStream with each piece passed to `emit`
        (`meta`: more gRPC metadata, such as the session's `multiplexed_model_id`)."""
        agent_stub, _ = self._stubs()
        meta = (("application", route.app),) + self.auth.metadata() + tuple(meta)
        timeout = self.settings.hop_timeout_s
        try:
            if emit is None:
                return await agent_stub.Receive(out, metadata=meta, timeout=timeout)
            rr, call = None, agent_stub.ReceiveStream(out, metadata=meta, timeout=timeout)
            try:
                async for chunk in call:
                    if chunk.HasField("reply"):
                        rr = chunk.reply
                    elif chunk.text:
                        emit(chunk.text)
            finally:  # left early (this request cancelled, its reader gone): end the target's stream now
                call.cancel()
            if rr is None:
                raise InvalidArgument("target stream ended without a reply", "target")
            return rr
        except grpc.RpcError as err:
            raise HopError(f"target {name!r}", err) from None

    async def _ask(self, req: pb.AskRequest, emit) -> pb.AskReply:
        t_start = now_ms()
        rid = packets.request_id(req.request_id)
        mode = packets.check_mode(req.mode)
        packets.check_question(req.question, self.limits.max_question_chars)
        packets.check_chars(req.context, self.limits.max_context_chars, "context")  # before any tokenising
        packets.check_session_id(req.session_id)
        max_new = packets.check_new_tokens(req.max_new_tokens, self.limits.default_new_tokens,
                                           self.limits.max_new_tokens)
        budget = req.message_tokens or self.settings.message_tokens
        if budget > self.limits.max_message_tokens:
            raise InvalidArgument(f"must be at most {self.limits.max_message_tokens} (max_message_tokens), "
                                  f"got {budget}", "message_tokens")
        name, route = self._route(req.target_agent)
        _, bridge_stub = self._stubs()
        tm = pb.Timings()
        out = pb.ReceiveRequest(request_id=rid, mode=mode, question=req.question, max_new_tokens=max_new)
        prov = pb.Provenance(request_id=rid, source_model=self.model.name)
        wire, source_tokens, message_tokens = 0, 0, 0
        timeout = self.settings.hop_timeout_s

        if mode in (pb.LATENT, pb.TEXT, pb.EXTRACT):  # tokenised (and checked) off the event loop
            prompt = await asyncio.to_thread(self.model.source_spans, req.context, req.question)
            source_tokens = len(prompt[0])
        if mode in (pb.LATENT, pb.EXTRACT):  # the source spends the budget on what the question needs
            t0 = now_ms()
            layer = (route.source_layer or self.layer) if mode == pb.LATENT else None
            msg, tm.source_batch = await self.plans.submit((prompt, req.question, budget, layer))
            tm.source_prefill_ms = now_ms() - t0
            message_tokens = len(msg.positions)
        if mode == pb.LATENT:
            t1 = now_ms()
            prov.source_layer, prov.source_hidden_size = layer, self.model.hidden_size
            packet = pb.HiddenStatePacket(hidden=codec.encode(msg.states, self.settings.wire_dtype), provenance=prov,
                                          source_token_ids=msg.token_ids.tolist())  # the bridge's token index
            if msg.slot_of is not None:  # a merging selector's slots: the bridge sends one soft token per slot
                packet.slot_of.extend(msg.slot_of.tolist())
                packet.slot_weight.extend(msg.slot_weight.tolist())
            t2 = now_ms()
            try:
                tr = await bridge_stub.Translate(packet, metadata=(("application", route.bridge_app),)
                                                 + self.auth.metadata(), timeout=timeout)
            except grpc.RpcError as err:
                raise HopError("bridge", err) from None
            t3 = now_ms()
            tm.packet_encode_ms = (t2 - t1) + tr.packet_encode_ms
            tm.bridge_hop_ms, tm.bridge_ms, tm.bridge_batch = (t3 - t2) - tr.total_ms, tr.bridge_ms, tr.batch_size
            tm.packet_decode_ms = tr.packet_decode_ms
            out.latent.CopyFrom(tr.latent)
            wire += packet.ByteSize() + tr.latent.ByteSize()
            message_tokens = tr.latent.soft_tokens.shape[0] if tr.latent.soft_tokens.shape else 0
        elif mode == pb.EXTRACT:
            out.text.CopyFrom(pb.TextPacket(text=selection.extract_text(self.model, msg), num_tokens=message_tokens,
                                            provenance=prov))
        elif mode == pb.TEXT:
            gen, tm.source_batch = await self.messages.submit((prompt[0], budget))
            tm.source_prefill_ms, tm.source_decode_ms = gen.prefill_ms, gen.decode_ms
            out.text.CopyFrom(pb.TextPacket(text=gen.text, num_tokens=len(gen.token_ids), provenance=prov))
            message_tokens = len(gen.token_ids)
        elif mode == pb.DIRECT:
            out.text.CopyFrom(pb.TextPacket(text=req.context, provenance=prov))
        if out.WhichOneof("payload") == "text":
            wire += out.text.ByteSize()

        t4 = now_ms()
        replayed = 0
        if req.session_id:
            rr, replayed = await self._session_receive(req, out, name, route, emit)
        else:
            rr = await self._deliver(out, name, route, emit)
        t5 = now_ms()
        tm.target_hop_ms = (t5 - t4) - rr.total_ms
        tm.packet_decode_ms += rr.packet_decode_ms
        tm.target_prefill_ms, tm.target_decode_ms, tm.target_batch = rr.prefill_ms, rr.decode_ms, rr.batch_size
        tm.source_total_ms = now_ms() - t_start
        return metrics.reply(pb.AskReply(request_id=rid, answer=rr.answer, mode=mode, timings=tm, packet_bytes=wire,
                           source_tokens=source_tokens, message_tokens=message_tokens,
                           answer_tokens=rr.answer_tokens, source_model=self.model.name,
                           target_model=rr.target_model, target_agent=name, kv_cache_tokens=rr.kv_cache_tokens,
                           session_id=req.session_id, session_turns=rr.session_turns, replayed_turns=replayed))

    async def _session_receive(self, req: pb.AskRequest, out: pb.ReceiveRequest, name: str, route,
                               emit) -> tuple[pb.ReceiveReply, int]:
        """Relay turn `req.session_turn` of a session to the target replica that holds it, and log it.

        A target that lost the session (NOT_FOUND: its replica restarted or evicted it) or holds
        another turn count (FAILED_PRECONDITION: a stale copy) gets the logged turns replayed from
        turn 0, then this turn: the session continues as if nothing was lost. Returns the reply
        and the number of turns replayed."""
        s = self.session_logs.open(req.session_id, req.session_turn)
        if s.state is None:
            s.state = TurnLog(lock=asyncio.Lock())
        async with s.state.lock:
            check_turn(s, req.session_turn)  # a concurrent turn of the same number got here first
            out.session_id, out.session_turn = req.session_id, req.session_turn
            meta = (("multiplexed_model_id", req.session_id),)  # Serve routes to the replica holding it
            replayed = 0
            try:
                rr = await self._deliver(out, name, route, emit, meta)
            except HopError as err:
                if not (err.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
                        and "session_id" in str(err)) or not s.state.requests:
                    raise
                for turn, (data, answer) in enumerate(zip(s.state.requests, s.state.answers)):
                    again = pb.ReceiveRequest.FromString(data)
                    again.session_turn = turn
                    got = await self._deliver(again, name, route, None, meta)
                    if got.answer != answer:  # greedy and alone: only a changed model answers otherwise
                        log.warning("session %r turn %d replayed to a different answer", req.session_id, turn)
                replayed = len(s.state.requests)
                rr = await self._deliver(out, name, route, emit, meta)
            s.state.requests.append(out.SerializeToString())
            s.state.answers.append(rr.answer)
            s.turns, s.tokens = req.session_turn + 1, rr.kv_cache_tokens
        return rr, replayed

