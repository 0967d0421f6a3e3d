"""Who may call which method of which application: bearer tokens checked inside the deployments.

Serve's gRPC proxy forwards every call it can route (by the `application` metadata) and has no
authentication (nor TLS) of its own, so each replica checks the caller's
`authorization: Bearer <token>` metadata before doing any work (`services.status.rpc` calls
`check`). Two secrets, each read from an environment variable named in the settings (never from the
config file) and compared in constant time:

- the external token (`auth.token_env`): what clients send to the source agent's public methods
  (`Ask`, `AskStream`, the A2A RPCs);
- the internal token (`auth.internal_token_env`): what the source sends on its own hops to the
  bridge (`Translate`) and the target (`Receive`, `ReceiveStream`). Those internal methods take it
  and nothing else, so a client holding the external token cannot feed a target soft tokens of its
  own making. The same secret keys the bridge's packet signatures (`services.signing`).

Each application serves a fixed set of methods (`SERVED`, chosen by the app's kind: a bridge, or an
agent by its `role`); a method routed to another application is refused UNIMPLEMENTED, naming where
it is served. Serve's proxy calls the replica's method named like the RPC and, where there is none,
answers with an error of its own listing the replica's methods; so each servicer inherits from
`refusals` a method for every RPC it may be sent but never serves (the bridge: AgentService's and
A2A's; an agent: BridgeService's), generated from the service's protobuf descriptor. The health
check (`Check`) is not an `rpc` method and stays open.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from typing import Literal

from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from latentwire.errors import LatentWireError, PermissionDenied
from latentwire.settings import AgentSettings, AuthSettings, BridgeSettings
from services import status

SCHEME = "bearer"
PUBLIC, INTERNAL = "public", "internal"
Access = Literal["public", "internal"]

# What each kind of application serves: method -> the credential it takes. A method missing from
# the map is not served there; `"*"` is every other method (the A2A RPCs the agent mixes in).
SERVED: dict[str, dict[str, Access | None]] = {
    "source": {"Ask": PUBLIC, "AskStream": PUBLIC, "*": PUBLIC, "Translate": None,
               # any agent can answer a packet: a source may be another source's target
               "Receive": INTERNAL, "ReceiveStream": INTERNAL},
    "target": {"Receive": INTERNAL, "ReceiveStream": INTERNAL},
    "bridge": {"Translate": INTERNAL},
}
# where a method is served, for the refusal of a call routed elsewhere (anything else: the source's)
HOME = {"Receive": "a target agent's application", "ReceiveStream": "a target agent's application",
        "Translate": "the bridge's application"}
SOURCE_HOME = "the source agent's application"
_SIGNING_CONTEXT = b"latentwire.v1 latent packet signature"


class Unauthenticated(LatentWireError):
    code = "UNAUTHENTICATED"


def app_kind(settings) -> str:
    """The application's kind: "bridge", or an agent's role ("source" or "target")."""
    if isinstance(settings, BridgeSettings):
        return "bridge"
    if isinstance(settings, AgentSettings):
        return settings.role
    raise TypeError(f"no application kind for {type(settings).__name__}")


def served(kind: str, method: str) -> Access | None:
    table = SERVED[kind]
    return table[method] if method in table else table.get("*")


def wrong_app(method: str):
    return status.wrong_app(method, HOME.get(method, SOURCE_HOME))


def refusals(kind: str, *services: ServiceDescriptor) -> type:
    """A base class for the servicer of an application of `kind`: one method for each RPC of
    `services` that such an application does not serve, refusing it UNIMPLEMENTED (`check` refuses
    it first on a gRPC call; the body, for a direct call), with the RPC's reply type."""
    methods = {m.name: _refusal(m) for service in services for m in service.methods if served(kind, m.name) is None}
    return type(f"{kind.title()}Refusals", (), {"__doc__": f"RPCs a {kind} application refuses", **methods})


def _refusal(method: MethodDescriptor):
    if method.client_streaming:
        raise TypeError(f"{method.full_name}: client-streaming RPCs are not served through services.status.rpc")
    name, reply = method.name, message_factory.GetMessageClass(method.output_type)
    if method.server_streaming:
        async def refuse(self, request, grpc_context=None):
            raise wrong_app(name)
            yield  # an async generator, as a server-streaming RPC must be
    else:
        async def refuse(self, request, grpc_context=None):
            raise wrong_app(name)
    refuse.__name__ = refuse.__qualname__ = name  # what rpc and the metrics know the method by
    return status.rpc(reply)(refuse)


def _token(env, name: str, s: AuthSettings, needed: bool) -> bytes:
    token = env.get(name, "")
    if needed and not token:
        raise RuntimeError(f"auth.required is set but the environment variable {name} is empty; "
                           "refusing to serve without a token")
    if token and s.required and len(token) < s.min_token_chars:
        raise RuntimeError(f"the token in {name} has {len(token)} characters; at least "
                           f"{s.min_token_chars} are required (auth.min_token_chars)")
    return token.encode()


class BearerAuth:
    """The credentials of one application (`kind`: "source", "target" or "bridge").

    `check(method, metadata)` refuses a call to a method this application does not serve, or
    without the credential that method takes; `metadata()` is the internal credential this service
    sends on its own hops; `packet_key` keys the bridge's signatures (None without an internal token).
    """

    def __init__(self, settings: AuthSettings | dict | None = None, *, kind: str = "source", environ=None):
        self.settings = s = AuthSettings.model_validate(settings or {})
        if kind not in SERVED:
            raise ValueError(f"unknown application kind {kind!r}; expected one of {sorted(SERVED)}")
        self.kind = kind
        env = os.environ if environ is None else environ
        public = any(a == PUBLIC for a in SERVED[kind].values())
        # every app needs the internal token when auth is on (the source sends it, the others take
        # it); the external one only where public methods are served
        self._token = _token(env, s.token_env, s, s.required and public)
        self._internal = _token(env, s.internal_token_env, s, s.required)
        if self._internal and self._internal == self._token:
            raise RuntimeError(f"{s.internal_token_env} holds the same token as {s.token_env}: the internal "
                               "token must be a secret of its own, or any client could call the internal hops")
        self.required = s.required
        self.packet_key = (hmac.new(self._internal, _SIGNING_CONTEXT, hashlib.sha256).digest()
                           if self._internal else None)

    @classmethod
    def of(cls, settings) -> "BearerAuth":
        """The auth of a deployment from its settings (AgentSettings or BridgeSettings)."""
        return cls(getattr(settings, "auth", None), kind=app_kind(settings))

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        access = served(self.kind, method)
        if not self.required:
            if access is None:
                raise wrong_app(method)
            return
        given = _bearer(metadata)
        # compare_digest takes time independent of where the strings differ; never echo the token
        external = bool(self._token) and hmac.compare_digest(given, self._token)
        internal = hmac.compare_digest(given, self._internal)
        if not (external or internal):
            raise Unauthenticated("invalid bearer token")
        if access is None:
            raise wrong_app(method)
        if access == INTERNAL and not internal:
            raise PermissionDenied(f"{method} is an internal hop between LatentWire's services and takes the "
                                   f"internal token ({self.settings.internal_token_env}), not a client's "
                                   f"bearer token; clients call Ask or AskStream on {SOURCE_HOME}",
                                   "authorization")
        if access == PUBLIC and not external:
            raise PermissionDenied(f"{method} takes a client's bearer token ({self.settings.token_env}), "
                                   "not the internal token of the services' own hops", "authorization")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata for this service's own calls to the bridge and target (empty without an internal token)."""
        return (("authorization", f"Bearer {self._internal.decode()}"),) if self._internal else ()


def _bearer(metadata) -> bytes:
    values = [v for k, v in metadata or () if k.lower() == "authorization"]
    if not values:
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
    if len(values) > 1:
        raise Unauthenticated("more than one authorization header")
    value = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
    scheme, _, given = value.strip().partition(" ")
    if scheme.lower() != SCHEME or not given:
        raise Unauthenticated("authorization must use the Bearer scheme")
    return given.strip().encode("utf-8", "replace")
