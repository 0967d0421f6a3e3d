"""Tensor <-> protobuf `Tensor` codec: raw little-endian bytes, zero-copy where the dtype allows.

Decoding validates everything a hostile peer controls (dtype, shape, byte length, finiteness, size)
and raises `InvalidArgument` naming the field, before a single value reaches a model.
"""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import torch

from latentwire.errors import InvalidArgument, ResourceExhausted
from protos.latentwire.v1 import latentwire_pb2 as pb

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TO_PB = {torch.float32: pb.FLOAT32, torch.float16: pb.FLOAT16, torch.bfloat16: pb.BFLOAT16}
_FROM_PB = {v: k for k, v in _TO_PB.items()}
# numpy has no bfloat16: move its bits as int16 and reinterpret in torch.
_NP_VIEW = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("latentwire's wire codec assumes a little-endian host")


def encode(t: torch.Tensor, dtype: str | torch.dtype = "bfloat16") -> pb.Tensor:
    wdtype = WIRE_DTYPES[dtype] if isinstance(dtype, str) else dtype
    if wdtype not in _TO_PB:
        raise ValueError(f"unsupported wire dtype {wdtype}; use one of {sorted(WIRE_DTYPES)}")
    t = t.detach().to(device="cpu", dtype=wdtype).contiguous()
    data = t.view(torch.int16).numpy().tobytes() if wdtype is torch.bfloat16 else t.numpy().tobytes()
    return pb.Tensor(shape=list(t.shape), dtype=_TO_PB[wdtype], data=data)


def wire(t: torch.Tensor, dtype: str | None) -> torch.Tensor:
    """`t` rounded as `encode(t, dtype)` then `decode` would give it back (fp32), without the bytes:
    what evaluation and fitting feed the bridge so that they see the packets serving sees."""
    return t if dtype in (None, "float32") else t.to(WIRE_DTYPES[dtype]).float()


def decode(msg: pb.Tensor, *, field: str = "tensor", ndim: int | None = None,
           last_dim: int | None = None, max_elements: int = 1 << 26,
           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if msg.dtype not in _FROM_PB:
        raise InvalidArgument(f"unsupported dtype {msg.dtype}; expected FLOAT32, FLOAT16 or BFLOAT16",
                              f"{field}.dtype")
    shape = list(msg.shape)
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(f"expected {ndim} dimensions, got shape {shape}", f"{field}.shape")
    if any(d <= 0 for d in shape):
        raise InvalidArgument(f"every dimension must be positive, got shape {shape}", f"{field}.shape")
    n = math.prod(shape)
    if n > max_elements:
        raise ResourceExhausted(f"{n} elements exceed the limit of {max_elements}", f"{field}.shape")
    if last_dim is not None and shape[-1] != last_dim:
        raise InvalidArgument(f"last dimension is {shape[-1]}, the receiver expects {last_dim}",
                              f"{field}.shape")
    dtype = _FROM_PB[msg.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != n * itemsize:
        raise InvalidArgument(f"{len(msg.data)} bytes do not fit shape {shape} of {itemsize}-byte "
                              f"elements ({n * itemsize} expected)", f"{field}.data")
    # frombuffer is a view on the protobuf's bytes; the cast to out_dtype makes the only copy.
    arr = np.frombuffer(msg.data, dtype=_NP_VIEW[dtype])
    with warnings.catch_warnings():  # read-only view: safe, the cast below copies before any write
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    t = (t.view(dtype) if dtype is torch.bfloat16 else t).reshape(shape).to(out_dtype)
    if not torch.isfinite(t).all():
        raise InvalidArgument("contains NaN or Inf", f"{field}.data")
    return t


def nbytes(msg: pb.Tensor) -> int:
    return len(msg.data)
