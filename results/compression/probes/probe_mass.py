"""Probe: does the super-tokens' attention mass (log W + c) matter? Packaged sidecar, 8x, W=8."""
import json, math, sys, time
import torch
torch.set_num_threads(2)
from compression import cache as C
from compression.evaluate import EvalConfig, eval_method, fact_items
from latentwire import profiles
from latentwire.runtime import AgentModel

model_name = sys.argv[1]
offsets = [float(x) for x in sys.argv[2].split(",")]
window = int(sys.argv[3]) if len(sys.argv) > 3 else 0
cfg = EvalConfig(model=model_name, context=768, facts=5, decode_tokens=4, window=window)
model, tok = profiles.load(model_name, dtype="float32")
eos = AgentModel(model_name, model=model, tokenizer=tok).eos_ids
items = fact_items(tok, cfg.facts, cfg.context, cfg.ppl_tokens, cfg.seed)
orig = C.merge_log_count
out = {}
for c in offsets:
    def patched(log_count, start, m, window, compressor, c=c):
        lc = orig(log_count, start, m, window, compressor)
        lc[start:start + m] += c
        return lc
    C.merge_log_count = patched
    t = time.time()
    res, _ = eval_method(model, tok, items, "fmkvc", cfg, 8, eos)
    out[c] = res["perplexity"]
    print(c, round(res["perplexity"], 3), res["fact_recall"], f"{time.time()-t:.0f}s", flush=True)
print(json.dumps(out))
