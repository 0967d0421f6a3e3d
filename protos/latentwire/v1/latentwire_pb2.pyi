from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT8: _ClassVar[DType]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LATENT: _ClassVar[Mode]
    TEXT: _ClassVar[Mode]
    DIRECT: _ClassVar[Mode]
    NONE: _ClassVar[Mode]
    EXTRACT: _ClassVar[Mode]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT8: DType
LATENT: Mode
TEXT: Mode
DIRECT: Mode
NONE: Mode
EXTRACT: Mode

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data", "scale")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    scale: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ..., scale: _Optional[_Iterable[float]] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("request_id", "source_model", "source_layer", "source_hidden_size", "target_model", "target_hidden_size", "bridge_id", "bridge_sha256")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_LAYER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_ID_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_SHA256_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    source_model: str
    source_layer: int
    source_hidden_size: int
    target_model: str
    target_hidden_size: int
    bridge_id: str
    bridge_sha256: str
    def __init__(self, request_id: _Optional[str] = ..., source_model: _Optional[str] = ..., source_layer: _Optional[int] = ..., source_hidden_size: _Optional[int] = ..., target_model: _Optional[str] = ..., target_hidden_size: _Optional[int] = ..., bridge_id: _Optional[str] = ..., bridge_sha256: _Optional[str] = ...) -> None: ...

class HiddenStatePacket(_message.Message):
    __slots__ = ("hidden", "provenance", "source_token_ids", "slot_of", "slot_weight")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SLOT_OF_FIELD_NUMBER: _ClassVar[int]
    SLOT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    provenance: Provenance
    source_token_ids: _containers.RepeatedScalarFieldContainer[int]
    slot_of: _containers.RepeatedScalarFieldContainer[int]
    slot_weight: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., source_token_ids: _Optional[_Iterable[int]] = ..., slot_of: _Optional[_Iterable[int]] = ..., slot_weight: _Optional[_Iterable[float]] = ...) -> None: ...

class LatentPacket(_message.Message):
    __slots__ = ("soft_tokens", "provenance", "signature")
    SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    soft_tokens: Tensor
    provenance: Provenance
    signature: bytes
    def __init__(self, soft_tokens: _Optional[_Union[Tensor, _Mapping]] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ..., signature: _Optional[bytes] = ...) -> None: ...

class TextPacket(_message.Message):
    __slots__ = ("text", "num_tokens", "provenance")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    text: str
    num_tokens: int
    provenance: Provenance
    def __init__(self, text: _Optional[str] = ..., num_tokens: _Optional[int] = ..., provenance: _Optional[_Union[Provenance, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("source_prefill_ms", "source_decode_ms", "packet_encode_ms", "bridge_hop_ms", "bridge_ms", "target_hop_ms", "packet_decode_ms", "target_prefill_ms", "target_decode_ms", "source_total_ms", "source_batch", "bridge_batch", "target_batch")
    SOURCE_PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PACKET_ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_HOP_MS_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_MS_FIELD_NUMBER: _ClassVar[int]
    TARGET_HOP_MS_FIELD_NUMBER: _ClassVar[int]
    PACKET_DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TARGET_PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    TARGET_DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_BATCH_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_BATCH_FIELD_NUMBER: _ClassVar[int]
    TARGET_BATCH_FIELD_NUMBER: _ClassVar[int]
    source_prefill_ms: float
    source_decode_ms: float
    packet_encode_ms: float
    bridge_hop_ms: float
    bridge_ms: float
    target_hop_ms: float
    packet_decode_ms: float
    target_prefill_ms: float
    target_decode_ms: float
    source_total_ms: float
    source_batch: int
    bridge_batch: int
    target_batch: int
    def __init__(self, source_prefill_ms: _Optional[float] = ..., source_decode_ms: _Optional[float] = ..., packet_encode_ms: _Optional[float] = ..., bridge_hop_ms: _Optional[float] = ..., bridge_ms: _Optional[float] = ..., target_hop_ms: _Optional[float] = ..., packet_decode_ms: _Optional[float] = ..., target_prefill_ms: _Optional[float] = ..., target_decode_ms: _Optional[float] = ..., source_total_ms: _Optional[float] = ..., source_batch: _Optional[int] = ..., bridge_batch: _Optional[int] = ..., target_batch: _Optional[int] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("request_id", "context", "question", "mode", "max_new_tokens", "target_agent", "message_tokens", "session_id", "session_turn")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_AGENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TURN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: str
    question: str
    mode: Mode
    max_new_tokens: int
    target_agent: str
    message_tokens: int
    session_id: str
    session_turn: int
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[str] = ..., question: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., max_new_tokens: _Optional[int] = ..., target_agent: _Optional[str] = ..., message_tokens: _Optional[int] = ..., session_id: _Optional[str] = ..., session_turn: _Optional[int] = ...) -> None: ...

class AskReply(_message.Message):
    __slots__ = ("request_id", "answer", "mode", "timings", "packet_bytes", "source_tokens", "message_tokens", "answer_tokens", "source_model", "target_model", "target_agent", "kv_cache_tokens", "session_id", "session_turns", "replayed_turns")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PACKET_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_AGENT_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TURNS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_TURNS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    answer: str
    mode: Mode
    timings: Timings
    packet_bytes: int
    source_tokens: int
    message_tokens: int
    answer_tokens: int
    source_model: str
    target_model: str
    target_agent: str
    kv_cache_tokens: int
    session_id: str
    session_turns: int
    replayed_turns: int
    def __init__(self, request_id: _Optional[str] = ..., answer: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., packet_bytes: _Optional[int] = ..., source_tokens: _Optional[int] = ..., message_tokens: _Optional[int] = ..., answer_tokens: _Optional[int] = ..., source_model: _Optional[str] = ..., target_model: _Optional[str] = ..., target_agent: _Optional[str] = ..., kv_cache_tokens: _Optional[int] = ..., session_id: _Optional[str] = ..., session_turns: _Optional[int] = ..., replayed_turns: _Optional[int] = ...) -> None: ...

class AskChunk(_message.Message):
    __slots__ = ("text", "reply")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    text: str
    reply: AskReply
    def __init__(self, text: _Optional[str] = ..., reply: _Optional[_Union[AskReply, _Mapping]] = ...) -> None: ...

class ReceiveRequest(_message.Message):
    __slots__ = ("request_id", "mode", "question", "max_new_tokens", "latent", "text", "session_id", "session_turn")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TURN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    mode: Mode
    question: str
    max_new_tokens: int
    latent: LatentPacket
    text: TextPacket
    session_id: str
    session_turn: int
    def __init__(self, request_id: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., question: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., latent: _Optional[_Union[LatentPacket, _Mapping]] = ..., text: _Optional[_Union[TextPacket, _Mapping]] = ..., session_id: _Optional[str] = ..., session_turn: _Optional[int] = ...) -> None: ...

class ReceiveReply(_message.Message):
    __slots__ = ("request_id", "answer", "answer_tokens", "packet_decode_ms", "prefill_ms", "decode_ms", "total_ms", "target_model", "kv_cache_tokens", "batch_size", "session_id", "session_turns")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PACKET_DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TURNS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    answer: str
    answer_tokens: int
    packet_decode_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    target_model: str
    kv_cache_tokens: int
    batch_size: int
    session_id: str
    session_turns: int
    def __init__(self, request_id: _Optional[str] = ..., answer: _Optional[str] = ..., answer_tokens: _Optional[int] = ..., packet_decode_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., target_model: _Optional[str] = ..., kv_cache_tokens: _Optional[int] = ..., batch_size: _Optional[int] = ..., session_id: _Optional[str] = ..., session_turns: _Optional[int] = ...) -> None: ...

class ReceiveChunk(_message.Message):
    __slots__ = ("text", "reply")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    text: str
    reply: ReceiveReply
    def __init__(self, text: _Optional[str] = ..., reply: _Optional[_Union[ReceiveReply, _Mapping]] = ...) -> None: ...

class TranslateReply(_message.Message):
    __slots__ = ("latent", "bridge_ms", "total_ms", "packet_decode_ms", "packet_encode_ms", "batch_size")
    LATENT_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    PACKET_DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PACKET_ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    latent: LatentPacket
    bridge_ms: float
    total_ms: float
    packet_decode_ms: float
    packet_encode_ms: float
    batch_size: int
    def __init__(self, latent: _Optional[_Union[LatentPacket, _Mapping]] = ..., bridge_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., packet_decode_ms: _Optional[float] = ..., packet_encode_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...
