"""Explicit limits and service settings (pydantic), shared by the services, CLI and tests."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# the packets' wire encoding (latentwire.codec.WIRE_DTYPES): int8 is a quarter of float32's bytes
WireDType = Literal["bfloat16", "float16", "float32", "int8"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a config is an error, not a silent default


CHARS_PER_TOKEN = 16  # the default character cap per token of max_context_tokens (Limits.max_context_chars)


class Limits(_Strict):
    """What one request may ask for; anything beyond is refused with a status that names the limit."""

    max_context_tokens: int = Field(2048, gt=0)
    # characters of a context (AskRequest.context) or text payload (ReceiveRequest.text.text), checked
    # before tokenising: a tokenizer's time and memory grow with the characters, so the token limit
    # alone would be checked only after the work it bounds. None: CHARS_PER_TOKEN x max_context_tokens,
    # generous for any text that fits the token limit (English runs about 4 characters a token)
    max_context_chars: int | None = Field(None, gt=0)
    max_question_chars: int = Field(4000, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    default_new_tokens: int = Field(24, gt=0)
    max_packet_elements: int = Field(1 << 24, gt=0)  # 64 MiB of fp32
    max_packet_tokens: int = Field(8192, gt=0)  # rows of any tensor packet
    # the message budget's ceiling: a request's `message_tokens` above it is refused, and a target
    # refuses a LATENT packet of more soft tokens
    max_message_tokens: int = Field(256, gt=0)
    max_message_bytes: int = Field(256 << 20, gt=0)  # gRPC channel limit on both ends

    @model_validator(mode="after")
    def _context_chars(self) -> "Limits":
        if self.max_context_chars is None:
            self.max_context_chars = CHARS_PER_TOKEN * self.max_context_tokens
        return self


class AuthSettings(_Strict):
    """Bearer-token check on every RPC of a deployment (Serve's gRPC proxy does not authenticate).

    Two tokens (services/auth.py): clients send the external one (`token_env`) to the source's
    Ask/AskStream; the source sends the internal one (`internal_token_env`) on its hops to the
    bridge and target, which take nothing else, and the internal one keys the bridge's signatures
    on latent packets. Tokens never sit in a config: replicas read them from these environment
    variables (on a cluster: two Kubernetes Secrets or the launcher's environment). A deployment
    with `required: true` and a token missing from its environment fails to start rather than run
    open. Without `required`, calls are not checked, but an internal token that is set still signs
    and verifies packets.
    """

    required: bool = False
    token_env: str = "LATENTWIRE_AUTH_TOKEN"
    internal_token_env: str = "LATENTWIRE_INTERNAL_TOKEN"
    min_token_chars: int = Field(16, gt=0)  # refuse to start with a guessable token


class TargetRoute(_Strict):
    """Where a named target agent is reached (Serve applications behind the gRPC proxy)."""

    app: str = "target"
    bridge_app: str = "bridge"
    source_layer: int | None = None  # the layer this route's bridge reads; None: the agent's source_layer


class KVCompression(_Strict):
    """KV-cache compression of an agent's generation (compression.cache): FMKVC or a baseline."""

    # a method registered in compression.methods: a window method (fmkvc, mean_pool, mean_pool_mass,
    # dense) or a kvpress scorer press (streamingllm, snapkv, knorm), which prunes the cache to the
    # entries the window method would keep at W = `window`; the name and the options below are checked
    # against that registry where the agent builds its cache factory (compression.session.factory),
    # since this core package cannot import compression/
    method: str = "fmkvc"
    weights: str | None = None  # sidecar .safetensors; None: the packaged one for the agent's profile
    # the sidecar's sha256, pinned by the deployment: the bytes loaded must match it (and the manifest)
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    window: int = Field(8, ge=2)  # W cached tokens -> 1 super-token (the nominal reduction)
    sink: int = Field(4, ge=0)  # first tokens kept dense
    recent: int = Field(64, ge=1)  # newest tokens kept dense
    # window methods: exact entries kept per window by the method's query-agnostic importance (key
    # norm), the rest pooled into the super-token; a window then costs keep + 1 entries, so the
    # reduction is window / (keep + 1) (window 16, keep 1: 8x). 0: super-tokens only
    keep: int = Field(0, ge=0)
    # window methods on models with sliding-window layers (Gemma 3, Mistral): "newest" keeps those
    # layers' newest entries (as many as pooling would leave) and no super-token, "pool" pools them like
    # the full-attention layers. They forget what leaves their window anyway, a long session's facts
    # live in the full-attention layers, and super-tokens there derail Gemma 3 in a conversation
    # (docs/sessions.md: eval-session)
    sliding_layers: Literal["newest", "pool"] = "newest"
    # how the `keep` exact entries are chosen: "window", each window's by key norm as it is compressed;
    # "reconstruction", across each prompt by context reconstruction (KVzip's signal, one more pass
    # over the prompt; compression/reconstruction.py), spread over the layers by their scores
    select: Literal["window", "reconstruction"] = "window"
    # fmkvc: after each prompt's prefill, fit the super-tokens to the prompt's own newest tokens
    # (compression/refine.py). Better answers from old text, at the price of `refine_steps` forward and
    # backward passes over `recent` tokens in the prefill (about 18 s a 768-token prompt on 2 CPU cores
    # for SmolLM2 at 30 steps); 0: off
    refine_steps: int = Field(0, ge=0, le=1000)
    refine_lr: float = Field(3e-4, gt=0, le=1.0)


class SessionLimits(_Strict):
    """What one agent replica keeps of its sessions (latentwire.sessions): a target the sessions' KV
    caches, a source the log of their turns. A new session past `max_sessions` evicts the least
    recently used one; a session unused for `idle_s` seconds expires."""

    max_sessions: int = Field(64, gt=0)  # sessions held per replica
    max_tokens: int = Field(8192, gt=0)  # KV entries of one session; a turn that would pass it is refused
    idle_s: float = Field(900.0, gt=0)


class PacketSelection(_Strict):
    """How a source spends the message budget M (latentwire.selection): a registered selector
    (`prefix`, `lexical`, `attention`, `merge`) and its parameters (`before`, `after`,
    `needs_attention_layer`, `weight`...)."""

    method: str = "lexical"
    params: dict[str, float | int] = {}


class AgentSettings(_Strict):
    """One agent actor. Every agent can answer (`Receive`); one with `targets` can also `Ask`."""

    profile: str
    # what the app serves (services/auth.py): every agent answers packets (Receive, ReceiveStream);
    # only a source takes clients' requests (Ask, AskStream, A2A); a target refuses them UNIMPLEMENTED
    role: Literal["source", "target"] = "source"
    source_layer: int | None = None  # None: the profile's default
    message_tokens: int = Field(64, gt=0)  # the message budget M of TEXT, EXTRACT and LATENT
    selection: PacketSelection = PacketSelection()  # which context tokens a LATENT/EXTRACT message carries
    wire_dtype: WireDType = "bfloat16"
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None  # torch intra-op threads in this actor
    limits: Limits = Limits()
    local_path: str | None = None  # production profiles: a local weights directory instead of the hub id
    # source only: where the other services are reached over gRPC (the Serve proxy)
    grpc_address: str = "127.0.0.1:9000"
    targets: dict[str, TargetRoute] = {"default": TargetRoute()}  # agent name -> its Serve apps
    hop_timeout_s: float = Field(120.0, gt=0)  # deadline of each call to the bridge / target
    kv_compression: KVCompression | None = None  # None: transformers' dense cache
    sessions: SessionLimits = SessionLimits()  # conversations whose turns share a KV cache
    # Concurrent requests share one forward (services.batching): the source's LATENT states and
    # TEXT messages, the target's answers. A batch takes all that queued while the model was busy;
    # an idle model waits `batch_wait_timeout_s` for company. Under load the queue fills batches by
    # itself, so the wait is kept short: it is latency every request pays at low load.
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    # padded prompt tokens one batched generation prefills; a larger batch runs as several (None: no
    # bound, right for a GPU; the CPU configs set 4096, see AgentModel.batch_tokens)
    max_batch_tokens: int | None = Field(None, gt=0)
    # dtype of each generation's prompt forward (decode steps stay in `dtype`); auto: bfloat16 for a
    # float32 model with the dense cache on an AMX CPU (AgentModel.use_prefill_dtype)
    prefill_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # target only: bridges whose packets are accepted (ids); empty: any bridge for this target
    accepted_bridges: list[str] = []
    # target only: sha256 of the bridge weights whose packets are accepted (`provenance.bridge_sha256`,
    # signed by the bridge when it holds the internal token); empty: any
    accepted_bridge_sha256: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = []
    auth: AuthSettings = AuthSettings()


class BridgeSettings(_Strict):
    weights: str | None = None  # path to .safetensors (manifest beside it); None: the packaged default
    # the bridge's sha256, pinned by the deployment: the bytes loaded must match it (and the manifest,
    # which sits beside the weights and could be rewritten with them)
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    # an aligned bridge reads its vocabulary rows from the target's weights: a safetensors directory,
    # None: the target profile's own (the converted embedded model, or the hub cache)
    target_path: str | None = None
    device: str = "cpu"
    wire_dtype: WireDType = "bfloat16"
    threads: int | None = None
    # dtype an aligned bridge scores its vocabulary in to pick each soft token's nearest rows (their
    # mix stays float32); auto: bfloat16 on a GPU or an AMX CPU, float32 elsewhere
    search_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # an aligned bridge's token index (bridge/token_index.py): "auto" uses the one beside the weights
    # if there is one (X.index.safetensors), a path names one, "none" always searches the whole vocabulary
    token_index: str = "auto"
    # concurrent Translate calls share one padded forward (services.batching); the burst a source batch
    # sends then reaches the target together, where it can be batched again
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    limits: Limits = Limits()
    auth: AuthSettings = AuthSettings()


def grpc_channel_options(limits: Limits = Limits()) -> list[tuple[str, int]]:
    # gRPC clients default to 4 MiB messages even though the Serve proxy allows 2 GiB.
    return [("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.max_receive_message_length", limits.max_message_bytes)]
