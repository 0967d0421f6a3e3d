"""Calibrate an (untrained) Perceiver bridge: normaliser statistics from the real models on offline text.

Source side: per-dimension mean/std of layer-L hidden states over pydoc text. Target side: the
per-dimension mean/std of the input embeddings of the same text, so soft tokens start at the
target's embedding scale (the RMS ratio metric starts near 1).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from bridge.perceiver import PerceiverBridge, PerceiverConfig
from latentwire.runtime import AgentModel
from latentwire.textdata import text_chunks


@torch.no_grad()
def calibrate(source: AgentModel, target: AgentModel, *, layer: int | None = None, num_queries: int = 32,
              n_texts: int = 48, seed: int = 0, progress: bool = True,
              source_states: torch.Tensor | None = None, **cfg_kw) -> PerceiverBridge:
    """`source_states` (N, d_src): layer-L states to fit the normaliser on instead of running the
    source over the offline text (training passes its cached prompts: on-distribution, no forward)."""
    layer = layer or source.profile.source_layer
    torch.manual_seed(seed)
    cfg = PerceiverConfig(source.name, target.name, layer, source.hidden_size, target.hidden_size,
                       num_queries=num_queries, **cfg_kw)
    bridge = PerceiverBridge(cfg)
    texts = text_chunks(n_texts, min_chars=400)
    hs, es = [], []
    for text in tqdm(texts, desc="calibrate", disable=not progress):
        if source_states is None:
            hs.append(source.hidden_states(source.tokenize(text)[:256], layer).float())
        es.append(target.embed(target.tokenize(text)[:256][None])[0].float())
    h, e = (torch.cat(hs) if source_states is None else source_states.float()), torch.cat(es)
    bridge.normalizer.mean.copy_(h.mean(0))
    bridge.normalizer.log_std.copy_(h.std(0).clamp_min(1e-5).log())
    bridge.scaling.scale.copy_(e.std(0))
    bridge.scaling.shift.copy_(e.mean(0))
    return bridge.eval()
