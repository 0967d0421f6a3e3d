"""The msgpack packet envelope: the gRPC LatentPacket's bytes, replayable both ways, and a clear
refusal (the field named) of every malformed envelope, random bytes included."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentwire import codec, envelope
from latentwire.errors import InvalidArgument, ResourceExhausted
from latentwire.settings import Limits
from protos.latentwire.v1 import latentwire_pb2 as pb

PROV = pb.Provenance(request_id="req-1", source_model="tiny-llama", source_layer=2, source_hidden_size=64,
                     target_model="tiny-mistral", target_hidden_size=96, bridge_id="tiny-bridge",
                     bridge_sha256="ab" * 32)


def packet(dtype="bfloat16", rows=4, width=96, prov=PROV) -> pb.LatentPacket:
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows))
    return pb.LatentPacket(soft_tokens=codec.encode(x, dtype), provenance=prov)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_round_trip_is_the_protobuf_packet_byte_for_byte(dtype):
    p = packet(dtype)
    env = envelope.to_envelope(p)
    q = envelope.from_envelope(env)
    assert q.SerializeToString(deterministic=True) == p.SerializeToString(deterministic=True)
    assert envelope.to_envelope(q) == env  # and back: a recorded envelope replays as the same bytes
    assert torch.equal(codec.decode(q.soft_tokens, ndim=2, last_dim=96), codec.decode(p.soft_tokens))


def test_envelope_body_is_the_tensor_bytes_and_says_what_it_is():
    p = packet("int8", rows=3)
    env = msgpack.unpackb(envelope.to_envelope(p))
    assert env["v"] == 1 and env["kind"] == "latentwire.latent-packet"
    assert env["body"] == p.soft_tokens.data
    h = env["header"]
    assert h["shape"] == [3, 96] and h["dtype"] == "int8" and h["signature"] == b""
    assert len(h["scale"]) == 3 * 4 and h["bridge_id"] == "tiny-bridge" and h["source_layer"] == 2
    assert "scale" not in msgpack.unpackb(envelope.to_envelope(packet("float16")))["header"]
    assert envelope.MEDIA_TYPE == "application/vnd.latentwire.packet+msgpack; version=1"


def test_empty_provenance_round_trips():
    p = packet("float32", prov=pb.Provenance())
    assert envelope.from_envelope(envelope.to_envelope(p)) == p


def _env(dtype="int8", **changes) -> bytes:
    """A valid envelope with top-level keys or `header_<key>` values replaced (`...=DROP` removes)."""
    env = msgpack.unpackb(envelope.to_envelope(packet(dtype, rows=2)))
    for key, value in changes.items():
        where, key = (env["header"], key[7:]) if key.startswith("header_") else (env, key)
        if value is DROP:
            del where[key]
        else:
            where[key] = value
    return msgpack.packb(env, use_bin_type=True)


DROP = object()
F32 = b"\0\0\x80\x3f"  # 1.0


@pytest.mark.parametrize("data, field", [
    (b"", "envelope"),
    (b"\xc1", "envelope"),
    (msgpack.packb([1, 2]), "envelope"),
    (envelope.to_envelope(packet()) + b"\0", "envelope"),
    (_env(extra=1), "envelope"),
    (_env(v=2), "envelope.v"),
    (_env(v=True), "envelope.v"),
    (_env(v="1"), "envelope.v"),
    (_env(v=DROP), "envelope.v"),
    (_env(kind="latentwire.hidden-packet"), "envelope.kind"),
    (_env(header=[]), "envelope.header"),
    (_env(header_extra=1), "envelope.header"),
    (_env(header_bridge_id=DROP), "envelope.header.bridge_id"),
    (_env(header_bridge_id=b"tiny-bridge"), "envelope.header.bridge_id"),
    (_env(header_request_id="r" * 129), "envelope.header.request_id"),
    (_env(header_bridge_sha256="AB" * 32), "envelope.header.bridge_sha256"),
    (_env(header_source_layer=2**31), "envelope.header.source_layer"),
    (_env(header_source_layer=2.0), "envelope.header.source_layer"),
    (_env(header_target_hidden_size=False), "envelope.header.target_hidden_size"),
    (_env(header_shape=[]), "envelope.header.shape"),
    (_env(header_shape=[2, 0]), "envelope.header.shape"),
    (_env(header_shape=[2, -96]), "envelope.header.shape"),
    (_env(header_shape=[2, 96.0]), "envelope.header.shape"),
    (_env(header_shape="2x96"), "envelope.header.shape"),
    (_env(header_shape=[2, 97]), "envelope.body"),
    (_env(header_dtype="int4"), "envelope.header.dtype"),
    (_env(header_dtype=4), "envelope.header.dtype"),
    (_env(header_dtype="float16"), "envelope.body"),
    (_env(header_scale=DROP), "envelope.header.scale"),
    (_env(header_scale=[1.0, 1.0]), "envelope.header.scale"),
    (_env(header_scale=F32), "envelope.header.scale"),
    (_env(header_scale=F32 * 3), "envelope.header.scale"),
    (_env(header_scale=F32 + b"\0\0\0\0"), "envelope.header.scale"),
    (_env(header_scale=F32 + b"\0\0\xc0\x7f"), "envelope.header.scale"),  # NaN
    (_env(header_scale=F32 + b"\0\0\x80\xbf"), "envelope.header.scale"),  # -1.0
    (_env("float32", header_scale=F32 * 2), "envelope.header.scale"),
    (_env(header_signature=b"sig"), "envelope.header.signature"),
    (_env(header_signature=""), "envelope.header.signature"),
    (_env(body="text"), "envelope.body"),
    (_env(body=b"\1" * 191), "envelope.body"),
])
def test_malformed_envelopes_are_refused_naming_the_field(data, field):
    with pytest.raises(InvalidArgument) as err:
        envelope.from_envelope(data)
    assert err.value.field == field and err.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("value, words", [
    (DROP, "missing"), ("ab" * 16, "expected bin, got str"), ([1, 2], "expected bin, got list"),
    (b"\0" * 31, "32 bytes (HMAC-SHA256), or empty when unsigned; got 31 bytes"),
    (b"\0" * 33, "got 33 bytes"), (b"\0" * 64, "got 64 bytes")])
def test_the_signature_slot_holds_the_bridges_hmac_or_nothing(value, words):
    from services import signing

    assert envelope.SIGNATURE_BYTES == signing.SIZE == 32
    with pytest.raises(InvalidArgument) as err:
        envelope.from_envelope(_env(header_signature=value))
    assert err.value.field == "envelope.header.signature" and words in str(err.value), err.value
    assert str(err.value).startswith("envelope.header.signature: ")


def test_a_refusal_echoes_a_peers_value_cut_short():
    nested = {"a" * 300: ["x" * 300] * 8, "b": [[[1] * 8] * 8] * 8}
    for data, field in [(_env(v=nested), "envelope.v"), (_env(kind=["y" * 300] * 8), "envelope.kind"),
                        (_env(header_dtype="z" * 300), "envelope.header.dtype")]:
        with pytest.raises(InvalidArgument) as err:
            envelope.from_envelope(data)
        assert err.value.field == field and len(str(err.value)) < 250, str(err.value)


def test_sizes_are_capped_before_unpacking():
    limits = Limits(max_packet_elements=100, max_message_bytes=1 << 16)
    with pytest.raises(ResourceExhausted) as err:  # the whole message
        envelope.from_envelope(b"\0" * ((1 << 16) + 1), limits)
    assert err.value.field == "envelope"
    # an array header claiming 2**32 items, a body over the element limit: refused before allocating
    for data in [b"\xdd\xff\xff\xff\xff", envelope.to_envelope(packet(rows=5))]:  # 960 bytes > 4 * 100
        with pytest.raises(ResourceExhausted) as err:
            envelope.from_envelope(data, limits)
        assert err.value.field == "envelope"
    with pytest.raises(InvalidArgument) as err:  # a bin claiming 4 GiB with nothing behind it
        envelope.from_envelope(b"\x84\xc6\xff\xff\xff\xff", limits)
    assert err.value.field == "envelope"
    with pytest.raises(ResourceExhausted) as err:  # a shape over the element limit, body never read
        envelope.from_envelope(_env(header_shape=[1 << 20, 1 << 20]))
    assert err.value.field == "envelope.header.shape"


# ---- fuzz: random bytes and mutated valid envelopes ----------------------------------------------------
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMITS = Limits(max_packet_elements=1 << 16, max_message_bytes=1 << 20)
VALID = [envelope.to_envelope(packet(d, rows=r)) for d in ["float32", "bfloat16", "int8"] for r in (1, 3)]
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=80),
              st.binary(max_size=300), st.sampled_from([2**31, -(2**31) - 1, "int8", "float16", "", b""])),
    lambda inner: st.one_of(st.lists(inner, max_size=10), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=12)
HEADER_KEYS = ["request_id", "source_model", "source_layer", "source_hidden_size", "target_model",
               "target_hidden_size", "bridge_id", "bridge_sha256", "shape", "dtype", "scale", "signature", "extra"]


def check(data: bytes) -> None:
    """Refused with a clear error naming an envelope field, or a packet the codec decodes or refuses."""
    try:
        p = envelope.from_envelope(data, LIMITS)
    except (InvalidArgument, ResourceExhausted) as err:
        assert err.field and err.field.startswith("envelope"), err
        return
    assert envelope.from_envelope(envelope.to_envelope(p), LIMITS) == p
    try:
        codec.decode(p.soft_tokens, field="latent.soft_tokens", max_elements=LIMITS.max_packet_elements)
    except InvalidArgument as err:
        assert err.field.startswith("latent.soft_tokens."), err


@FUZZ
@given(data=st.one_of(st.binary(max_size=2048), st.builds(lambda b: b"\x84" + b, st.binary(max_size=512))))
def test_fuzz_random_bytes(data):
    check(data)


@FUZZ
@given(base=st.sampled_from(VALID), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                    min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_mutated_bytes(base, edits, cut):
    data = bytearray(base)
    for pos, byte in edits:
        data[pos % len(data)] = byte
    check(bytes(data[: cut % len(data)] if cut is not None else data))


@FUZZ
@given(base=st.sampled_from(VALID), top=st.sampled_from([None, "v", "kind", "header", "body", "extra"]),
       key=st.sampled_from(HEADER_KEYS), value=VALUES, drop=st.booleans())
def test_fuzz_mutated_fields(base, top, key, value, drop):
    env = msgpack.unpackb(base)
    where, key = (env, top) if top is not None else (env["header"], key)
    if drop:
        where.pop(key, None)
    else:
        where[key] = value
    check(msgpack.packb(env, use_bin_type=True))
