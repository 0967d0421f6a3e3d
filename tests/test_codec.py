"""The packet tensor codec: exact round trips and a clear refusal of every malformed tensor."""

import math

import pytest
import torch

from latentwire import codec
from latentwire.errors import InvalidArgument, ResourceExhausted
from protos.latentwire.v1 import latentwire_pb2 as pb


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_exact_in_the_wire_dtype(dtype):
    x = torch.randn(7, 33)
    msg = codec.encode(x, dtype)
    assert list(msg.shape) == [7, 33]
    assert len(msg.data) == 7 * 33 * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    y = codec.decode(pb.Tensor.FromString(msg.SerializeToString()), ndim=2, last_dim=33)
    assert torch.equal(y, x.to(getattr(torch, dtype)).float())


def test_bfloat16_halves_the_bytes_of_float32():
    x = torch.randn(16, 64)
    assert codec.nbytes(codec.encode(x, "bfloat16")) * 2 == codec.nbytes(codec.encode(x, "float32"))


def test_decode_keeps_the_requested_output_dtype():
    y = codec.decode(codec.encode(torch.ones(2, 3), "float16"), out_dtype=torch.float16)
    assert y.dtype == torch.float16 and y.shape == (2, 3)


def _msg(shape=(2, 3), dtype=pb.FLOAT32, nbytes=None, fill=1.0):
    n = math.prod(shape)
    data = torch.full((n,), fill).numpy().tobytes() if dtype == pb.FLOAT32 else b"\0\0" * n
    if nbytes is not None:
        data = data[:nbytes] if nbytes <= len(data) else data + b"\0" * (nbytes - len(data))
    return pb.Tensor(shape=list(shape), dtype=dtype, data=data)


@pytest.mark.parametrize("msg, kw, field", [
    (_msg(dtype=pb.DTYPE_UNSPECIFIED), {}, "tensor.dtype"),
    (_msg(dtype=99), {}, "tensor.dtype"),
    (_msg(shape=(2, 3)), {"ndim": 3}, "tensor.shape"),
    (_msg(shape=(2, 0)), {}, "tensor.shape"),
    (_msg(shape=(2, 3)), {"last_dim": 4}, "tensor.shape"),
    (_msg(shape=()), {"last_dim": 4}, "tensor.shape"),
    (_msg(nbytes=23), {}, "tensor.data"),
    (_msg(nbytes=25), {}, "tensor.data"),
    (_msg(fill=float("nan")), {}, "tensor.data"),
    (_msg(fill=float("inf")), {}, "tensor.data"),
])
def test_malformed_tensors_are_refused_naming_the_field(msg, kw, field):
    with pytest.raises(InvalidArgument) as err:
        codec.decode(msg, **kw)
    assert err.value.field == field and err.value.code == "INVALID_ARGUMENT"


def test_negative_dimension_is_refused():
    msg = pb.Tensor(shape=[-2, -3], dtype=pb.FLOAT32, data=b"\0" * 24)
    with pytest.raises(InvalidArgument, match="positive"):
        codec.decode(msg)


def test_huge_shape_is_refused_before_allocating():
    msg = pb.Tensor(shape=[1 << 20, 1 << 20], dtype=pb.FLOAT32, data=b"")
    with pytest.raises(ResourceExhausted, match="exceed"):
        codec.decode(msg, max_elements=1 << 24)


# ---- int8: symmetric, one absmax scale per row -------------------------------------------------------
def test_int8_round_trip_is_within_half_a_step_of_each_row():
    x = torch.randn(9, 40) * torch.logspace(-3, 3, 9)[:, None]  # rows of very different magnitudes
    msg = pb.Tensor.FromString(codec.encode(x, "int8").SerializeToString())
    assert msg.dtype == pb.INT8 and list(msg.shape) == [9, 40]
    assert len(msg.data) == 9 * 40 and len(msg.scale) == 9
    assert codec.nbytes(msg) == 9 * 40 + 4 * 9  # a quarter of float32's bytes, plus a float a row
    y = codec.decode(msg, ndim=2, last_dim=40)
    absmax = x.abs().amax(dim=1)
    assert torch.allclose(torch.tensor(list(msg.scale)), absmax)
    step = absmax / 127
    assert ((y - x).abs() <= step[:, None] / 2 * (1 + 1e-5)).all()
    assert torch.allclose(y.abs().amax(dim=1), absmax, rtol=1e-6, atol=0)  # each row's extreme is sent as is


def test_int8_wire_is_what_the_codec_sends():
    x = torch.randn(3, 4, 16)
    assert torch.equal(codec.wire(x, "int8"), codec.decode(codec.encode(x, "int8")))
    assert codec.wire(x, "int8").dtype == torch.float32 and codec.wire(x, "int8").shape == x.shape


def test_int8_zero_rows_decode_to_zero():
    x = torch.zeros(2, 5)
    x[1, 2] = -3.0
    msg = codec.encode(x, "int8")
    assert list(msg.scale) == [1.0, 3.0]
    assert torch.equal(codec.decode(msg), x)


def _int8(shape=(2, 3), scale=(1.0, 2.0), data=None):
    n = math.prod(shape)
    return pb.Tensor(shape=list(shape), dtype=pb.INT8, data=bytes([1] * n) if data is None else data, scale=scale)


@pytest.mark.parametrize("msg, field", [
    (_int8(scale=()), "tensor.scale"),
    (_int8(scale=(1.0,)), "tensor.scale"),
    (_int8(scale=(1.0, 2.0, 3.0)), "tensor.scale"),
    (_int8(scale=(1.0, 0.0)), "tensor.scale"),
    (_int8(scale=(1.0, -2.0)), "tensor.scale"),
    (_int8(scale=(1.0, float("nan"))), "tensor.scale"),
    (_int8(scale=(float("inf"), 1.0)), "tensor.scale"),
    (_int8(data=b"\1" * 5), "tensor.data"),
    (_int8(data=b"\1" * 7), "tensor.data"),
    (_int8(data=b"\1\1\x80\1\1\1"), "tensor.data"),  # -128: outside the symmetric code
    (_int8(shape=(2, 0)), "tensor.shape"),
    (pb.Tensor(shape=[2, 3], dtype=pb.FLOAT32, data=b"\0" * 24, scale=[1.0, 1.0]), "tensor.scale"),
])
def test_malformed_int8_tensors_are_refused_naming_the_field(msg, field):
    with pytest.raises(InvalidArgument) as err:
        codec.decode(msg)
    assert err.value.field == field and err.value.code == "INVALID_ARGUMENT"


def test_int8_scale_overflowing_float32_is_refused():
    msg = _int8(shape=(1, 2), scale=(3e38,), data=b"\x7f\x7f")
    assert torch.isfinite(codec.decode(msg)).all()  # 127 * s / 127 stays finite
    with pytest.raises(InvalidArgument) as err:
        codec.decode(msg, out_dtype=torch.float16)
    assert err.value.field == "tensor.data"


def test_settings_accept_int8_and_refuse_unknown_wire_dtypes():
    from pydantic import ValidationError

    from latentwire.settings import AgentSettings, BridgeSettings

    assert AgentSettings(profile="tiny-llama", wire_dtype="int8").wire_dtype == "int8"
    assert BridgeSettings(wire_dtype="int8").wire_dtype == "int8"
    with pytest.raises(ValidationError, match="wire_dtype"):
        BridgeSettings(wire_dtype="int4")
