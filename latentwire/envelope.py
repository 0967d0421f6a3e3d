"""A latent packet as self-describing bytes: the transport-independent msgpack envelope.

The gRPC `LatentPacket` lives inside one RPC; the envelope carries the same packet over anything that
moves bytes (an A2A message part, a queue, Ray's object store, a file), with the media type
`MEDIA_TYPE`. Version 1 is one msgpack map:

    {"v": 1, "kind": "latentwire.latent-packet",
     "header": {"request_id": str, "source_model": str, "source_layer": int, "source_hidden_size": int,
                "target_model": str, "target_hidden_size": int, "bridge_id": str, "bridge_sha256": str,
                "shape": [int, ...], "dtype": "float32" | "float16" | "bfloat16" | "int8",
                "scale": bin (int8 only: one little-endian float32 per row),
                "signature": bin (the bridge's 32-byte HMAC-SHA256 of the packet, `LatentPacket.signature`;
                              empty from a deployment without an internal token)},
     "body": bin (the tensor's raw little-endian bytes, exactly as in `Tensor.data`)}

`to_envelope` and `from_envelope` convert between the two without touching the tensor bytes, so a
packet recorded from one replays through the other byte for byte. `from_envelope` validates like
the protobuf codec: sizes capped before msgpack allocates anything (Unpacker limits), every field
type- and range-checked, unknown versions, kinds and keys refused, each refusal an
`InvalidArgument` / `ResourceExhausted` naming the field (`envelope.header.shape`), a signature
slot that is not bin of 0 or 32 bytes included (`envelope.header.signature`). The tensor's values
(finiteness, the int8 code's range) are checked where every packet is, by `codec.decode` at the
receiver, and so is the signature's value (a target holding the services' internal key recomputes
the HMAC), so a packet the bridge signed stays acceptable after a trip through bytes. Echoed values
are cut short (`latentwire.errors.show`).
"""

from __future__ import annotations

import math
import re

import msgpack
import numpy as np

from latentwire import codec
from latentwire.errors import InvalidArgument, ResourceExhausted, show
from latentwire.settings import Limits
from protos.latentwire.v1 import latentwire_pb2 as pb

VERSION = 1
KIND = "latentwire.latent-packet"
MEDIA_TYPE = "application/vnd.latentwire.packet+msgpack; version=1"

_DTYPE_NAMES = {pb.FLOAT32: "float32", pb.FLOAT16: "float16", pb.BFLOAT16: "bfloat16", pb.INT8: "int8"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
_STRINGS = {"request_id": 128, "source_model": 256, "target_model": 256, "bridge_id": 256, "bridge_sha256": 64}
_INTS = ("source_layer", "source_hidden_size", "target_hidden_size")  # int32 in the protobuf Provenance
_HEADER = set(_STRINGS) | set(_INTS) | {"shape", "dtype", "scale", "signature"}
_MAX_DIMS = 8
SIGNATURE_BYTES = 32  # the bridge's HMAC-SHA256 (services/signing.py)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def to_envelope(packet: pb.LatentPacket) -> bytes:
    """The envelope of a gRPC `LatentPacket`: the same tensor bytes and provenance."""
    t, p = packet.soft_tokens, packet.provenance
    if t.dtype not in _DTYPE_NAMES:
        raise ValueError(f"soft_tokens has no wire dtype ({t.dtype}); encode it with latentwire.codec first")
    header = {name: getattr(p, name) for name in (*_STRINGS, *_INTS)}
    header.update(shape=list(t.shape), dtype=_DTYPE_NAMES[t.dtype])
    if t.dtype == pb.INT8:
        header["scale"] = np.asarray(t.scale, dtype="<f4").tobytes()
    header["signature"] = packet.signature
    return msgpack.packb({"v": VERSION, "kind": KIND, "header": header, "body": t.data}, use_bin_type=True)


def from_envelope(data: bytes, limits: Limits | None = None) -> pb.LatentPacket:
    """The gRPC `LatentPacket` an envelope carries, every field checked against `limits`."""
    limits = limits or Limits()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"expected bytes, got {type(data).__name__}", "envelope")
    if len(data) > limits.max_message_bytes:
        raise ResourceExhausted(f"{len(data)} bytes exceed the limit of {limits.max_message_bytes} "
                                f"(max_message_bytes)", "envelope")
    max_bin = 4 * limits.max_packet_elements  # the largest body: fp32 elements
    try:
        env = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, max_bin_len=max_bin,
                              max_str_len=max(_STRINGS.values(), default=0) + 64, max_array_len=_MAX_DIMS,
                              max_map_len=32, max_ext_len=0)
    except (ValueError, msgpack.UnpackException) as err:
        if "exceeds max_" in str(err):
            raise ResourceExhausted(f"an object exceeds the envelope's size limits ({err})", "envelope") from None
        raise InvalidArgument(f"not a msgpack envelope ({type(err).__name__}: {err or 'malformed'})",
                              "envelope") from None
    if not isinstance(env, dict):
        raise InvalidArgument(f"expected a map, got {type(env).__name__}", "envelope")
    _keys(env, {"v", "kind", "header", "body"}, set(), "envelope")
    if type(env["v"]) is not int or env["v"] != VERSION:
        raise InvalidArgument(f"unsupported envelope version {show(env['v'])}; this reader speaks {VERSION}",
                              "envelope.v")
    if env["kind"] != KIND:
        raise InvalidArgument(f"unsupported kind {show(env['kind'])}; expected {KIND!r}", "envelope.kind")
    h, body = env["header"], env["body"]
    if not isinstance(h, dict):
        raise InvalidArgument(f"expected a map, got {type(h).__name__}", "envelope.header")
    _keys(h, _HEADER - {"scale"}, {"scale"}, "envelope.header")

    prov = pb.Provenance()
    for name, most in _STRINGS.items():
        value = _typed(h, name, str)
        if len(value) > most:
            raise InvalidArgument(f"{len(value)} characters exceed the limit of {most}", f"envelope.header.{name}")
        setattr(prov, name, value)
    if prov.bridge_sha256 and not _SHA256.match(prov.bridge_sha256):
        raise InvalidArgument("must be empty or 64 lowercase hex digits", "envelope.header.bridge_sha256")
    for name in _INTS:
        value = _typed(h, name, int)
        if not -(2**31) <= value < 2**31:
            raise InvalidArgument(f"{value} is out of the int32 range", f"envelope.header.{name}")
        setattr(prov, name, value)

    shape = _typed(h, "shape", list)
    if not shape or any(type(d) is not int or d <= 0 for d in shape):
        raise InvalidArgument(f"expected 1 to {_MAX_DIMS} positive dimensions, got {shape}", "envelope.header.shape")
    n = math.prod(shape)
    if n > limits.max_packet_elements:
        raise ResourceExhausted(f"{n} elements exceed the limit of {limits.max_packet_elements} "
                                f"(max_packet_elements)", "envelope.header.shape")
    dtype = _typed(h, "dtype", str)
    if dtype not in _DTYPES:
        raise InvalidArgument(f"unsupported dtype {show(dtype)}; expected one of {', '.join(_DTYPES)}",
                              "envelope.header.dtype")
    signature = _typed(h, "signature", bytes)
    if len(signature) not in (0, SIGNATURE_BYTES):
        raise InvalidArgument(f"the bridge's signature is {SIGNATURE_BYTES} bytes (HMAC-SHA256), or empty when "
                              f"unsigned; got {len(signature)} bytes", "envelope.header.signature")
    if not isinstance(body, bytes):
        raise InvalidArgument(f"expected bin, got {type(body).__name__}", "envelope.body")
    if len(body) != n * _ITEMSIZE[dtype]:
        raise InvalidArgument(f"{len(body)} bytes do not fit shape {shape} of {_ITEMSIZE[dtype]}-byte elements "
                              f"({n * _ITEMSIZE[dtype]} expected)", "envelope.body")

    tensor = pb.Tensor(shape=shape, dtype=_DTYPES[dtype], data=body)
    if dtype == "int8":
        tensor.scale.extend(_scales(h, codec.rows(shape)).tolist())
    elif "scale" in h:
        raise InvalidArgument(f"only int8 packets carry scales, this one is {dtype}", "envelope.header.scale")
    return pb.LatentPacket(soft_tokens=tensor, provenance=prov, signature=signature)


def _keys(m: dict, required: set, optional: set, field: str) -> None:
    for key in m:
        if key not in required and key not in optional:
            raise InvalidArgument(f"unknown key {show(key)}", field)
    for key in sorted(required - m.keys()):
        raise InvalidArgument("missing", f"{field}.{key}")


def _typed(h: dict, name: str, kind: type):
    value = h[name]
    if type(value) is not kind:  # exact: a bool is not an int here
        want = {str: "a string", int: "an integer", list: "an array", bytes: "bin"}[kind]
        raise InvalidArgument(f"expected {want}, got {type(value).__name__}", f"envelope.header.{name}")
    return value


def _scales(h: dict, rows: int) -> np.ndarray:
    raw = h.get("scale")
    if raw is None:
        raise InvalidArgument("missing (int8 packets carry one scale per row)", "envelope.header.scale")
    if type(raw) is not bytes:
        raise InvalidArgument(f"expected bin, got {type(raw).__name__}", "envelope.header.scale")
    if len(raw) != 4 * rows:
        raise InvalidArgument(f"{len(raw)} bytes for {rows} rows (one float32 a row: {4 * rows} expected)",
                              "envelope.header.scale")
    scale = np.frombuffer(raw, dtype="<f4")
    if not (np.isfinite(scale) & (scale > 0)).all():
        raise InvalidArgument("every scale must be finite and positive", "envelope.header.scale")
    return scale
