"""Tensor <-> protobuf `Tensor` codec: raw little-endian bytes, zero-copy where the dtype allows.

Wire dtypes: float32, float16, bfloat16 (the values rounded to that type) and int8, a symmetric
8-bit code with one scale per row (the row's absolute maximum s: q = round(x / s * 127), decoded as
q * s / 127), a quarter of float32's bytes plus 4 bytes a row.

Decoding validates everything a hostile peer controls (dtype, shape, byte length, scales,
finiteness, size) and raises `InvalidArgument` naming the field, before a single value reaches a model.
"""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import torch

from latentwire.errors import InvalidArgument, ResourceExhausted, show
from protos.latentwire.v1 import latentwire_pb2 as pb

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
_TO_PB = {torch.float32: pb.FLOAT32, torch.float16: pb.FLOAT16, torch.bfloat16: pb.BFLOAT16, torch.int8: pb.INT8}
_FROM_PB = {v: k for k, v in _TO_PB.items()}
# numpy has no bfloat16: move its bits as int16 and reinterpret in torch.
_NP_VIEW = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.int8: np.int8}
INT8_MAX = 127  # symmetric: -128 is never sent, and refused
MAX_DIMS = 8  # no packet has more dimensions; a peer's shape is counted before it is copied or multiplied

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("latentwire's wire codec assumes a little-endian host")


def rows(shape) -> int:
    """Rows of a tensor of this shape as the int8 code scales them: every dimension but the last."""
    return math.prod(shape[:-1]) if len(shape) else 1


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(rows(t.shape), t.shape[-1] if t.dim() else 1)


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (shape of `t`) and float32 per-row scales (the row's absmax; 1 for an all-zero row).
    A non-finite row gets a non-finite scale, which a receiver refuses."""
    x = _as_rows(t.detach().float())
    scale = x.abs().amax(dim=1, keepdim=True) if x.numel() else x.new_ones(x.shape[0], 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.nan_to_num(x / scale * INT8_MAX, nan=0.0).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(t.shape), scale.reshape(-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values of int8 codes `q` with per-row scales `scale` (the inverse of `quantize`)."""
    x = _as_rows(q).float() * (scale.float() / INT8_MAX)[:, None]
    return x.reshape(q.shape)


def encode(t: torch.Tensor, dtype: str | torch.dtype = "bfloat16") -> pb.Tensor:
    wdtype = WIRE_DTYPES[dtype] if isinstance(dtype, str) else dtype
    if wdtype not in _TO_PB:
        raise ValueError(f"unsupported wire dtype {wdtype}; use one of {sorted(WIRE_DTYPES)}")
    if wdtype is torch.int8:
        q, scale = quantize(t.detach().to("cpu"))
        return pb.Tensor(shape=list(q.shape), dtype=pb.INT8, data=q.contiguous().numpy().tobytes(),
                         scale=scale.tolist())
    t = t.detach().to(device="cpu", dtype=wdtype).contiguous()
    data = t.view(torch.int16).numpy().tobytes() if wdtype is torch.bfloat16 else t.numpy().tobytes()
    return pb.Tensor(shape=list(t.shape), dtype=_TO_PB[wdtype], data=data)


def wire(t: torch.Tensor, dtype: str | None) -> torch.Tensor:
    """`t` rounded as `encode(t, dtype)` then `decode` would give it back (fp32), without the bytes:
    what evaluation and fitting feed the bridge so that they see the packets serving sees. The int8
    code is computed on a detached copy: no gradient flows through it."""
    if dtype in (None, "float32"):
        return t
    if dtype == "int8":
        return dequantize(*quantize(t))
    return t.to(WIRE_DTYPES[dtype]).float()


def decode(msg: pb.Tensor, *, field: str = "tensor", ndim: int | None = None,
           last_dim: int | None = None, max_elements: int = 1 << 26,
           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if msg.dtype not in _FROM_PB:
        raise InvalidArgument(f"unsupported dtype {msg.dtype}; expected FLOAT32, FLOAT16, BFLOAT16 or INT8",
                              f"{field}.dtype")
    if ndim is not None and len(msg.shape) != ndim:
        raise InvalidArgument(f"expected {ndim} dimensions, got shape {show(msg.shape)}", f"{field}.shape")
    if len(msg.shape) > MAX_DIMS:
        raise InvalidArgument(f"{len(msg.shape)} dimensions exceed the limit of {MAX_DIMS}", f"{field}.shape")
    shape = list(msg.shape)
    if any(d <= 0 for d in shape):
        raise InvalidArgument(f"every dimension must be positive, got shape {show(shape)}", f"{field}.shape")
    n = math.prod(shape)
    if n > max_elements:
        raise ResourceExhausted(f"{n} elements exceed the limit of {max_elements}", f"{field}.shape")
    if last_dim is not None and (not shape or shape[-1] != last_dim):
        raise InvalidArgument(f"last dimension is {shape[-1] if shape else 'missing'}, the receiver "
                              f"expects {last_dim}", f"{field}.shape")
    dtype = _FROM_PB[msg.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != n * itemsize:
        raise InvalidArgument(f"{len(msg.data)} bytes do not fit shape {shape} of {itemsize}-byte "
                              f"elements ({n * itemsize} expected)", f"{field}.data")
    scale = _scales(msg, shape, field) if dtype is torch.int8 else None
    if scale is None and len(msg.scale):
        raise InvalidArgument(f"{len(msg.scale)} scales given; only INT8 tensors carry scales", f"{field}.scale")
    # frombuffer is a view on the protobuf's bytes; the cast to out_dtype makes the only copy.
    arr = np.frombuffer(msg.data, dtype=_NP_VIEW[dtype])
    with warnings.catch_warnings():  # read-only view: safe, the cast below copies before any write
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    if scale is not None:
        if bool((t == -INT8_MAX - 1).any()):
            raise InvalidArgument(f"INT8 values must lie in -{INT8_MAX}..{INT8_MAX} (-128 is not sent)",
                                  f"{field}.data")
        t = dequantize(t.reshape(shape), scale)
    t = (t.view(dtype) if dtype is torch.bfloat16 else t).reshape(shape).to(out_dtype)
    if not torch.isfinite(t).all():
        raise InvalidArgument("contains NaN or Inf", f"{field}.data")
    return t


def _scales(msg: pb.Tensor, shape: list[int], field: str) -> torch.Tensor:
    """An INT8 tensor's per-row scales, checked: one per row, each finite and positive."""
    want = rows(shape)
    if len(msg.scale) != want:
        raise InvalidArgument(f"{len(msg.scale)} scales for {want} rows of shape {shape} (one per row)",
                              f"{field}.scale")
    scale = torch.tensor(msg.scale, dtype=torch.float32)
    if not (torch.isfinite(scale) & (scale > 0)).all():
        raise InvalidArgument("every scale must be finite and positive", f"{field}.scale")
    return scale


def nbytes(msg: pb.Tensor) -> int:
    """Payload bytes of a tensor: its data and, for INT8, its float32 scales."""
    return len(msg.data) + 4 * len(msg.scale)
