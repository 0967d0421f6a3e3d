"""A2A v1 over gRPC on the agent deployment: `lf.a2a.v1.A2AService` as a front door to the same ask path.

Serve's gRPC proxy routes a call to the deployment method named like the RPC, so `A2AServicer` is a
mixin whose methods are the A2A RPCs, and `A2AAgentServicer` (what `services.app.agent_app` deploys)
is the agent servicer with it mixed in. The types and the servicer registration
(`services.a2a_wire.add_A2AServiceServicer_to_server`, listed in each config's
`grpc_servicer_functions`) come from `a2a-sdk`; its server plumbing (request handlers, task store,
event queue) does not run here: it owns the gRPC server, and Serve's proxy owns ours.

A message (`SendMessageRequest.message`) is read as:
- the first text part: the question; a second text part, or a data part `{"context": "..."}`: the
  context; then the same path as `Ask`, with `mode`, `target_agent`, `message_tokens` and
  `max_new_tokens` taken from the message metadata (request metadata as a fallback; defaults as Ask);
- or the question plus one raw part of media type `latentwire.envelope.MEDIA_TYPE`: a latent packet
  (`latentwire.envelope`) that goes, as is, to the `Receive` of `target_agent` (the receive path).

The answer comes back as a completed `Task`: one artifact "answer" with a text part (the answer) and
a data part (the reply's fields: per-stage timings, token counts, models). The streaming RPC sends the
task as WORKING, then one artifact update a piece of text, then the completed task. Tasks finish
within the call, so `GetTask` answers from a bounded cache of finished tasks and `CancelTask` refuses
(there is nothing left to cancel). `contextId` is passed through (there are no sessions yet).
Refusals are gRPC statuses set by `services.status.rpc`, as `Ask`'s are, naming the A2A field
(`message.parts[1].raw`, `message.metadata.mode`). Only the source serves these RPCs: a target
refuses them UNIMPLEMENTED (`services.auth.SERVED`), and so does the bridge, from refusals generated
from the A2A service descriptor (`services.auth.refusals`, `services.a2a_wire.SERVICE`).
"""

from __future__ import annotations

import collections
import contextlib
import uuid

from google.protobuf import empty_pb2, json_format, struct_pb2

from latentwire.envelope import MEDIA_TYPE, from_envelope
from latentwire.errors import FailedPrecondition, InvalidArgument, NotFound
from protos.latentwire.v1 import latentwire_pb2 as pb
from services import packets, streaming
from services.a2a_wire import a2a_pb2 as a2a  # with the pickling alias Serve needs
from services.agent import AgentServicer
from services.status import rpc

PROTOCOL_VERSION = "1.0"
TASK_CACHE = 1024  # finished tasks GetTask can still return (oldest dropped first)
_METADATA = {"mode": str, "target_agent": str, "message_tokens": int, "max_new_tokens": int}
_MEDIA_BASE = MEDIA_TYPE.partition(";")[0]


def agent_card(settings, url: str | None = None) -> a2a.AgentCard:
    """The A2A card of an agent deployment: its gRPC interface, skills and bearer scheme.

    `url` is where clients reach the gRPC ingress (the proxy); the default is the address the
    source itself dials (`grpc_address`), right for a local cluster. Callers route to the source
    application with the metadata `application: <app name>`, as for the latentwire gRPC API.
    """
    auth = getattr(settings, "auth", None)
    required = bool(auth and auth.required)
    modes = ", ".join(packets.MODES)
    card = a2a.AgentCard(
        name=f"latentwire-{settings.profile}",
        description="LatentWire agent: answers a question about a context by asking a target agent, "
                    "with the context sent as latent soft tokens, text or nothing.",
        version="0.1.0",
        supported_interfaces=[a2a.AgentInterface(url=url or settings.grpc_address, protocol_binding="GRPC",
                                                 protocol_version=PROTOCOL_VERSION)],
        capabilities=a2a.AgentCapabilities(streaming=True, push_notifications=False, extended_agent_card=True),
        default_input_modes=["text/plain", "application/json", MEDIA_TYPE],
        default_output_modes=["text/plain", "application/json"],
        skills=[
            a2a.AgentSkill(id="ask", name="Ask about a context",
                           description=f"Text part 1: the question; text part 2 or data part "
                                       f"{{'context': ...}}: the context. Metadata: mode ({modes}; default "
                                       f"latent), target_agent, message_tokens, max_new_tokens.",
                           tags=["question-answering", "latent-communication"],
                           input_modes=["text/plain", "application/json"],
                           output_modes=["text/plain", "application/json"]),
            a2a.AgentSkill(id="receive-latent-packet", name="Answer from a latent packet",
                           description="Text part: the question; raw part of media type "
                                       f"{MEDIA_TYPE}: a packet from the bridge, answered by the target "
                                       "agent named in metadata target_agent.",
                           tags=["latent-communication"], input_modes=["text/plain", MEDIA_TYPE],
                           output_modes=["text/plain", "application/json"]),
        ],
        security_schemes={"bearer": a2a.SecurityScheme(http_auth_security_scheme=a2a.HTTPAuthSecurityScheme(
            scheme="Bearer", description="gRPC metadata 'authorization: Bearer <token>'"))},
    )
    if required:
        card.security_requirements.add().schemes["bearer"].CopyFrom(a2a.StringList())
    return card


class A2AServicer:
    """Mixin for `AgentServicer`: methods named after the RPCs of `lf.a2a.v1.A2AService`."""

    _tasks: collections.OrderedDict  # task id -> finished Task

    def _task_cache(self) -> collections.OrderedDict:
        if not hasattr(self, "_tasks"):  # created lazily: the mixin adds nothing to __init__
            self._tasks = collections.OrderedDict()
        return self._tasks

    # ---- messages ------------------------------------------------------------------------------
    @rpc(a2a.SendMessageResponse)
    async def SendMessage(self, request: a2a.SendMessageRequest, grpc_context=None) -> a2a.SendMessageResponse:
        task = _new_task(request.message)
        reply = await self._a2a_run(request, task.id, None)
        return a2a.SendMessageResponse(task=self._finish(task, reply))

    @rpc(a2a.StreamResponse)
    async def SendStreamingMessage(self, request: a2a.SendMessageRequest, grpc_context=None):
        task = _new_task(request.message)
        yield a2a.StreamResponse(task=task)
        first = True
        # closed with this stream: a client that goes away cancels the request (its target stream stops)
        async with contextlib.aclosing(streaming.relay(lambda emit: self._a2a_run(request, task.id, emit))) as items:
            async for item in items:
                if not isinstance(item, str):  # the request's reply (its error is raised by relay)
                    yield a2a.StreamResponse(task=self._finish(task, item))
                    break
                yield a2a.StreamResponse(artifact_update=a2a.TaskArtifactUpdateEvent(
                    task_id=task.id, context_id=task.context_id, append=not first, last_chunk=False,
                    artifact=a2a.Artifact(artifact_id="answer", name="answer", parts=[a2a.Part(text=item)])))
                first = False

    async def _a2a_run(self, request: a2a.SendMessageRequest, task_id: str, emit):
        """The ask path (an AskReply) or, for a packet part, the receive path (a ReceiveReply)."""
        msg = request.message
        if not msg.parts:
            raise InvalidArgument("a message needs at least a text part (the question)", "message.parts")
        meta = _metadata(request)
        question, context, packet = _parts(msg)
        if packet is None:
            mode = packets.MODES["latent"] if "mode" not in meta else _mode(meta["mode"])
            ask = pb.AskRequest(request_id=task_id, question=question, context=context, mode=mode,
                                target_agent=meta.get("target_agent", ""),
                                message_tokens=meta.get("message_tokens", 0),
                                max_new_tokens=meta.get("max_new_tokens", 0))
            return await self._ask(ask, emit)
        if "mode" in meta and _mode(meta["mode"]) != pb.LATENT:
            raise InvalidArgument(f"a latent packet part is answered in mode latent, not {packets.show(meta['mode'])}",
                                  "message.metadata.mode")
        if "message_tokens" in meta:
            raise InvalidArgument("the packet is already written: no message budget applies",
                                  "message.metadata.message_tokens")
        packets.check_question(question, self.limits.max_question_chars)
        max_new = packets.check_new_tokens(meta.get("max_new_tokens", 0), self.limits.default_new_tokens,
                                           self.limits.max_new_tokens)
        name, route = self._route(meta.get("target_agent", ""))
        latent = from_envelope(packet, self.limits)
        out = pb.ReceiveRequest(request_id=task_id, mode=pb.LATENT, question=question, max_new_tokens=max_new,
                                latent=latent)
        return await self._deliver(out, name, route, emit)

    def _finish(self, task: a2a.Task, reply) -> a2a.Task:
        done = a2a.Task()
        done.CopyFrom(task)
        done.status.state = a2a.TASK_STATE_COMPLETED
        done.status.timestamp.GetCurrentTime()
        data = json_format.MessageToDict(reply, always_print_fields_with_no_presence=True,
                                         preserving_proto_field_name=True, unquote_int64_if_possible=True)
        data.pop("answer", None)
        done.artifacts.add(artifact_id="answer", name="answer",
                           parts=[a2a.Part(text=reply.answer), a2a.Part(data=_value(data))])
        cache = self._task_cache()
        cache[done.id] = done
        while len(cache) > TASK_CACHE:
            cache.popitem(last=False)
        return done

    # ---- tasks ---------------------------------------------------------------------------------
    @rpc(a2a.Task)
    async def GetTask(self, request: a2a.GetTaskRequest, grpc_context=None) -> a2a.Task:
        return self._known(request.id)

    @rpc(a2a.Task)
    async def CancelTask(self, request: a2a.CancelTaskRequest, grpc_context=None) -> a2a.Task:
        self._known(request.id)
        raise FailedPrecondition("the task is completed: tasks finish within their SendMessage call", "id")

    def _known(self, task_id: str) -> a2a.Task:
        task = self._task_cache().get(task_id)
        if task is None:
            raise NotFound(f"no task {task_id[:64]!r} (finished tasks are kept for the last {TASK_CACHE} only)",
                           "id")
        return task

    @rpc(a2a.AgentCard)
    async def GetExtendedAgentCard(self, request: a2a.GetExtendedAgentCardRequest, grpc_context=None):
        return agent_card(self.settings)

    # ---- what this agent does not offer: the refusal the a2a-sdk gives (UnsupportedOperation) ----
    @rpc(a2a.ListTasksResponse)
    async def ListTasks(self, request, grpc_context=None):
        raise _unsupported("ListTasks")

    @rpc(a2a.StreamResponse)
    async def SubscribeToTask(self, request, grpc_context=None):
        raise _unsupported("SubscribeToTask (tasks finish within their SendStreamingMessage call)")
        yield  # an async generator, as a server-streaming RPC must be

    @rpc(a2a.TaskPushNotificationConfig)
    async def CreateTaskPushNotificationConfig(self, request, grpc_context=None):
        raise _unsupported("push notifications")

    @rpc(a2a.TaskPushNotificationConfig)
    async def GetTaskPushNotificationConfig(self, request, grpc_context=None):
        raise _unsupported("push notifications")

    @rpc(a2a.ListTaskPushNotificationConfigsResponse)
    async def ListTaskPushNotificationConfigs(self, request, grpc_context=None):
        raise _unsupported("push notifications")

    @rpc(empty_pb2.Empty)
    async def DeleteTaskPushNotificationConfig(self, request, grpc_context=None):
        raise _unsupported("push notifications")


class A2AAgentServicer(A2AServicer, AgentServicer):
    """The agent deployment: latentwire's AgentService, health, and A2A."""


# ---- reading a message ---------------------------------------------------------------------------
def _new_task(msg: a2a.Message) -> a2a.Task:
    task = a2a.Task(id=uuid.uuid4().hex, context_id=msg.context_id or uuid.uuid4().hex,
                    status=a2a.TaskStatus(state=a2a.TASK_STATE_WORKING))
    task.status.timestamp.GetCurrentTime()
    task.history.add().CopyFrom(msg)
    return task


def _parts(msg: a2a.Message) -> tuple[str, str, bytes | None]:
    """(question, context, packet envelope or None) from the parts, each checked with its field named."""
    texts, context, packet = [], None, None
    for i, part in enumerate(msg.parts):
        field = f"message.parts[{i}]"
        kind = part.WhichOneof("content")
        if kind == "text":
            texts.append(part.text)
        elif kind == "data":
            if context is not None:
                raise InvalidArgument("only one data part (the context) is read", f"{field}.data")
            context = _context(part.data, f"{field}.data")
        elif kind == "raw":
            if part.media_type.replace(" ", "") != MEDIA_TYPE.replace(" ", ""):
                what = "another version of the packet envelope" if part.media_type.startswith(_MEDIA_BASE) \
                    else f"media type {part.media_type[:80]!r}"
                raise InvalidArgument(f"{what} is not read here; a raw part must be {MEDIA_TYPE!r}",
                                      f"{field}.media_type")
            if packet is not None:
                raise InvalidArgument("only one latent packet part is read", f"{field}.raw")
            packet = part.raw
        else:
            raise InvalidArgument(f"a {kind or 'empty'} part is not read here; send text, data or a raw packet",
                                  field)
    if not texts:
        raise InvalidArgument("no text part: the first text part is the question", "message.parts")
    if len(texts) > 2 or (len(texts) == 2 and (context is not None or packet is not None)):
        raise InvalidArgument("expected the question and at most one context (a second text part or a data "
                              "part), or the question and a packet part", "message.parts")
    if packet is not None and context is not None:
        raise InvalidArgument("a packet part carries the context already: send no data part with it",
                              "message.parts")
    if len(texts) == 2:
        context = texts[1]
    return texts[0], context or "", packet


def _context(value: struct_pb2.Value, field: str) -> str:
    if value.WhichOneof("kind") == "string_value":
        return value.string_value
    if value.WhichOneof("kind") != "struct_value":
        raise InvalidArgument("expected an object {'context': str} or a string", field)
    fields = value.struct_value.fields
    unknown = sorted(set(fields) - {"context"})
    if unknown:
        raise InvalidArgument(f"unknown key {unknown[0][:64]!r}; expected {{'context': str}}", field)
    if "context" not in fields or fields["context"].WhichOneof("kind") != "string_value":
        raise InvalidArgument("expected a string", f"{field}.context")
    return fields["context"].string_value


def _metadata(request: a2a.SendMessageRequest) -> dict:
    """The known keys of the message metadata (request metadata as a fallback), type-checked.

    Other keys are left alone: metadata is A2A's open extension map (tracing, client info).
    """
    out = {}
    for where, struct in (("metadata", request.metadata), ("message.metadata", request.message.metadata)):
        for key, kind in _METADATA.items():
            if key not in struct.fields:
                continue
            value, field = struct.fields[key], f"{where}.{key}"
            if kind is str:
                if value.WhichOneof("kind") != "string_value":
                    raise InvalidArgument("expected a string", field)
                out[key] = value.string_value
            else:
                n = value.number_value
                if value.WhichOneof("kind") != "number_value" or not 0 < n < 2**31 or n != int(n):
                    raise InvalidArgument("expected a positive integer", field)
                out[key] = int(n)
    return out


def _mode(name: str) -> int:
    try:
        return packets.parse_mode(name)
    except ValueError as err:
        raise InvalidArgument(str(err), "message.metadata.mode") from None


def _value(data: dict) -> struct_pb2.Value:
    v = struct_pb2.Value()
    v.struct_value.update(data)
    return v


def _unsupported(what: str) -> FailedPrecondition:
    return FailedPrecondition(f"unsupported operation: {what}")
