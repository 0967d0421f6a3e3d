"""Source hidden states, computed once: the source model is frozen, so training never runs it.

The prompt is `AgentModel.source_prompt(context, question)` (what serving sends the source), and
the states equal `AgentModel.hidden_states(ids, layer)[span]` per item, the context tokens a LATENT
packet carries (tested); several layers are
captured in one pass so a layer sweep costs one source forward. Stored as fp16 safetensors with
a manifest (latentwire.weights), right-padded, with per-item lengths.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm import tqdm

from latentwire import weights
from latentwire.runtime import AgentModel


class _Stop(Exception):
    pass


@torch.no_grad()
def source_states(source: AgentModel, items: list[dict], layers: list[int], batch_size: int = 16,
                  progress: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (states (N, T, d) fp16 right-padded, lengths (N,))}: the packets of the items' prompts."""
    prompts = [source.source_prompt(it["context"], it["question"]) for it in items]
    ids, spans = [p[0] for p in prompts], [p[1] for p in prompts]
    lengths = torch.tensor([sp.stop - sp.start for sp in spans])
    T = int(lengths.max())
    out = {layer: torch.zeros(len(ids), T, source.hidden_size, dtype=torch.float16) for layer in layers}
    captured: dict[int, torch.Tensor] = {}
    top = max(layers)

    def hook_for(layer):
        def hook(_mod, _args, o):
            captured[layer] = o[0] if isinstance(o, tuple) else o
            if layer == top:
                raise _Stop  # the layers above are never needed

        return hook

    handles = [source.model.model.layers[layer - 1].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        for s in tqdm(range(0, len(ids), batch_size), desc="source states", disable=not progress):
            chunk = ids[s : s + batch_size]
            t = max(len(x) for x in chunk)
            x = torch.full((len(chunk), t), source.tok.pad_token_id, dtype=torch.long, device=source.device)
            m = torch.zeros_like(x)
            for b, row in enumerate(chunk):
                x[b, : len(row)], m[b, : len(row)] = row, 1
            try:
                source.model.model(input_ids=x, attention_mask=m, use_cache=False)
            except _Stop:
                pass
            for layer in layers:
                h = captured[layer].to("cpu", torch.float16)
                for b, sp in enumerate(spans[s : s + len(chunk)]):
                    out[layer][s + b, : sp.stop - sp.start] = h[b, sp]
    finally:
        for h in handles:
            h.remove()
    return {layer: (out[layer], lengths) for layer in layers}


def items_digest(items: list[dict]) -> str:
    blob = json.dumps([[it["context"], it["question"], it["answer"]] for it in items]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_states(path: Path, states: torch.Tensor, lengths: torch.Tensor, *, source: str, layer: int,
                items: list[dict]) -> dict:
    return weights.save(path, {"states": states, "lengths": lengths}, kind="source-states",
                        config={"source": source, "layer": layer}, data={"items": items_digest(items), "n": len(items)})


def load_states(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    tensors, manifest = weights.load(path, kind="source-states")
    return tensors["states"], tensors["lengths"], manifest


def batch(states: torch.Tensor, lengths: torch.Tensor, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (B, t, d) fp32, mask (B, t)) for a list of item indices, trimmed to the longest."""
    t = int(lengths[idx].max())
    h = states[idx, :t].float()
    mask = (torch.arange(t)[None] < lengths[idx][:, None]).long()
    return h, mask
