"""Probe: which SmolLM2 layer's question-to-context attention finds the asked record (training items only).

For 8 plain and 8 look-alike training items of bridge/records.py at ~700 tokens, the attention
selector's scores at each layer pick M = 32 context tokens (anchors with 2 before, 8 after); a hit
is the gold answer's text among them. `lexical` is the lexical selector at the same budget.
Queries are the question and the prompt's tail ("with tail") or the question alone.

    .venv/bin/python results/budget/attention_layers.py 32 > results/budget/attention_layers.txt
"""

import sys

import torch
from transformers.utils import logging as hf_logging

from bridge.records import generate
from latentwire.runtime import AgentModel
from latentwire.selection import extract_text, make_selector, plan_message, question_attention, windows
from latentwire.settings import Limits

hf_logging.disable_progress_bar()
torch.set_num_threads(2)
src = AgentModel("smollm2-135m", limits=Limits(max_context_tokens=8192))
items = generate(8, "train", tokens=700) + generate(8, "train", tokens=700, tier="lookalike")
M = int(sys.argv[1]) if len(sys.argv) > 1 else 32
layers = [4, 8, 12, 16, 20, 24, 28]
hits = {layer: 0 for layer in layers}
hits_q = {layer: 0 for layer in layers}
lex = 0
for it in items:
    ids, span, asked = src.source_spans(it["context"], it["question"])
    qonly = slice(asked.start, asked.stop - 5)  # without the template tail
    for layer in layers:
        for qs, h in ((asked, hits), (qonly, hits_q)):
            att, _ = question_attention(src, ids, qs, span, layer)
            pos = torch.tensor(windows(att, M, 2, 8)) + span.start
            h[layer] += it["answer"] in src.tok.decode(ids[pos])
    m = plan_message(src, it["context"], it["question"], M, make_selector("lexical"))
    lex += it["answer"] in extract_text(src, m)
print("M", M, "n", len(items), "lexical", lex)
print("with tail", hits)
print("question only", hits_q)
