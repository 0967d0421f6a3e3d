"""Gemma 3 at a long context: FMKVC on the global layers only, sliding-window layers left dense (they
are bounded by their window anyway). Usage: probe_sliding_dense.py MODEL CONTEXT RATIO ITEMS"""
import sys
from dataclasses import replace

import torch

import compression.cache as cache_mod
import compression.evaluate as ev
from latentwire import profiles
from latentwire.runtime import AgentModel

name, context, ratio, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)
model, tok = profiles.load(name, dtype="float32")
model.requires_grad_(False)
eos = AgentModel(name, model=model, tokenizer=tok).eos_ids
cfg = ev.EvalConfig(model=name, context=context, facts=n, decode_tokens=4)
items = ev.fact_items(tok, n, context, cfg.ppl_tokens, cfg.seed)
dense, _ = ev.eval_method(model, tok, items, "dense", cfg, 1, eos)
print("dense", round(dense["perplexity"], 3), dense["fact_recall"], dense["kv_bytes"])
base = cache_mod.new_cache


def global_only(*a, **k):
    c = base(*a, **k)
    for layer in c.layers:
        if layer.is_sliding:
            layer.schedule = replace(layer.schedule, enabled=False)
    return c


for label, factory in (("fmkvc", base), ("fmkvc_global_only", global_only)):
    cache_mod.new_cache = factory
    res, _ = ev.eval_method(model, tok, items, "fmkvc", cfg, ratio, eos)
    print(label, round(res["perplexity"], 3), res["fact_recall"], "kv_reduction",
          round(dense["kv_bytes"] / res["kv_bytes"], 2), flush=True)
