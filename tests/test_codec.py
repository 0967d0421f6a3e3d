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
