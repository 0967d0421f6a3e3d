"""Where the reconstruction-chosen exact entries go in a Gemma 3 session (docs/sessions.md, "Exact
entries by context reconstruction, in a session"): runs the first three turns of a 5-turn
conversation (eval-session's generator, seed 1, its second conversation) with
fmkvc:keep=1:select=reconstruction and prints, at the end of each turn, each global layer's
compressible region ((first entry, entries), stored, n_final) and the exact entries
`FMKVCCache.allocate_exact` gives it.

    PYTHONPATH=$PWD .venv/bin/python results/session/probes/probe_exact_allocation.py

Output of the run docs/sessions.md cites (CPU, one thread):
  regions [(5, (4, 80), 157, 0), (11, (4, 80), 157, 0), (17, (4, 80), 157, 0)] budgets [(5, 11), (11, 1), (17, 0)]
  regions [(5, (20, 144), 231, 20), (11, (11, 144), 222, 11), (17, (10, 144), 221, 10)] budgets [(5, 24), (11, 0), (17, 0)]
  regions [(5, (52, 144), 262, 52), (11, (21, 144), 231, 21), (17, (20, 144), 230, 20)] budgets [(5, 24), (11, 0), (17, 0)]
"""
import torch

import compression.cache as C
from compression.session_eval import SessionEvalConfig, agent_for, conversations, run_session
from latentwire import profiles

torch.set_num_threads(1)
cfg = SessionEvalConfig(sessions=2, turns=5, seed=1, probes=0, max_new_tokens=8)
model, tok = profiles.load("gemma3-270m", dtype="float32")
allocate = C.FMKVCCache.allocate_exact


def allocate_and_print(self):
    regions = [(i, layer.compressible(), layer.stored(), layer.n_final)
               for i, layer in enumerate(self.layers) if layer.exact_scores is not None]
    allocate(self)
    print("  regions", regions, "budgets",
          [(i, layer.exact_budget) for i, layer in enumerate(self.layers) if layer.exact_scores is not None])


C.FMKVCCache.allocate_exact = allocate_and_print
run_session(agent_for("fmkvc:keep=1:select=reconstruction", cfg, model, tok), conversations(cfg)[1][:3], cfg, "s")
