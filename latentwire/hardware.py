"""What the hardware is good at, and the dtype a model's prompt forward runs in because of it.

A prompt forward (prefill) is compute-bound and a bfloat16 matrix multiply is several times faster
than a float32 one on a GPU or on a CPU with AMX tiles; elsewhere bfloat16 only costs time. One-token
decode steps are bandwidth-bound and stay in the model's own dtype (see `latentwire.engine`).
"""

from __future__ import annotations

import torch

def cpu_amx() -> bool:
    """Whether this CPU has AMX tiles (fast bfloat16 matrix multiplies)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def fast_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matrix multiplies beat float32 here: a GPU, or a CPU with AMX tiles."""
    return torch.device(device).type == "cuda" or cpu_amx()


def decoder_copy_fits(model, share: float = 0.25) -> bool:
    """Whether a bfloat16 copy of `model`'s decoder (no embedding table) takes under `share` of the
    memory available now: "auto" must not turn a float32 8B model on a CPU host into an
    out-of-memory replica."""
    import psutil

    table = model.get_input_embeddings().weight.numel()
    copy_bytes = 2 * (sum(p.numel() for p in model.get_decoder().parameters()) - table)
    return copy_bytes < share * psutil.virtual_memory().available


def prefill_dtype(model, dtype: str = "auto", *, dense_cache: bool = True) -> torch.dtype:
    """The dtype `model`'s prompt forward runs in for the setting `dtype` ("float32", "bfloat16",
    or "auto": bfloat16 for a float32 model on an AMX CPU when the copy fits in memory, else the
    model's own dtype).

    Only the dense cache takes another dtype than the model's: a compressed cache's sidecar
    compresses keys in the model's dtype.
    """
    own = next(model.parameters()).dtype
    if dtype == "auto":
        amx = next(model.parameters()).device.type == "cpu" and cpu_amx()
        want = torch.bfloat16 if (amx and own == torch.float32 and dense_cache
                                  and decoder_copy_fits(model)) else own
    elif dtype in ("float32", "bfloat16"):
        want = getattr(torch, dtype)
    else:
        raise ValueError(f"prefill dtype must be float32, bfloat16 or auto, not {dtype!r}")
    if want != own and not dense_cache:
        raise ValueError(f"prefill dtype {dtype} needs the dense cache (a compressed cache's sidecar "
                         f"works in the model's {str(own).removeprefix('torch.')})")
    return want
