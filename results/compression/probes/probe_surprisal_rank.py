"""Would the model's own surprisal pick the fact's tokens to keep dense? For each eval-cache item
(768 tokens, 10 items), rank every compressible token (after the 4 sink tokens, before the 124-token
recent window of the 8x `--window 32` layout) by -log p(token | prefix) and print the fact tokens'
surprisal and rank. Usage: probe_surprisal_rank.py MODEL"""
import sys

import torch

from compression.evaluate import fact_items
from latentwire import profiles

torch.set_num_threads(2)
model, tok = profiles.load(sys.argv[1], dtype="float32")
sink, recent, context = 4, 124, 768
n_fact = len(tok(" The access code of the amber vault is 1234.", add_special_tokens=False).input_ids)
for it in fact_items(tok, 10, context, 64, 0):
    ctx = it["context"]
    with torch.no_grad():
        logits = model(input_ids=ctx[None]).logits[0].float()
    s = torch.cat([torch.zeros(1), torch.nn.functional.cross_entropy(logits[:-1], ctx[1:], reduction="none")])
    at = it["fact_pos"] + 1  # the BOS shifts the context by one
    region = s[sink:context - recent]
    rank = torch.empty(len(region), dtype=torch.long)
    rank[region.argsort(descending=True)] = torch.arange(len(region))
    print(tok.convert_ids_to_tokens(ctx[at:at + n_fact].tolist()))
    print(" surprisal", [round(float(s[p]), 1) for p in range(at, at + n_fact)])
    print(" rank", [int(rank[p - sink]) for p in range(at, at + n_fact)], "of", len(region), flush=True)
