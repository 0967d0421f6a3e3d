"""Token index of the aligned bridge: which vocabulary rows to search for each source token.

The aligned bridge maps each context token's source state to a point in the target's embedding
space and mixes that point's nearest target vocabulary rows (bridge/aligned.py). Finding them scans
the whole vocabulary (46,003 rows for the embedded pair) for every token of every packet: at 1024
tokens that is the bridge's whole cost and a fifth of a LATENT exchange on a CPU. But a source token
lands near the same few target rows in every context (the map is lexical by design), so the rows it
picked on calibration text are a short list to search instead: `build` runs the source on offline
text and records, for each source token id, the `per_row` nearest rows of each of its occurrences.
A token never seen there is still searched in the whole vocabulary.

Stored as safetensors (`offsets`: int64 (V_src + 1), `rows`: int32 positions in the bridge's `vocab`)
with a manifest that names the bridge's sha256: an index is never used with another bridge.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from latentwire import weights
from latentwire.codec import wire

KIND = "bridge-token-index"


def default_path(bridge_path: str | Path) -> Path:
    """bridge/weights/X.safetensors -> bridge/weights/X.index.safetensors."""
    p = Path(bridge_path)
    return p.with_name(p.stem + ".index.safetensors")


@torch.no_grad()
def build(bridge, source, texts: list[str], per_row: int = 8, max_tokens: int = 1024,
          progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(offsets, rows, stats) from the source's layer-L states of `texts` (each cut at max_tokens),
    rounded to bfloat16 as the wire sends them, searched with the bridge's full vocabulary."""
    seen: dict[int, set[int]] = {}
    n_rows = 0
    t0 = time.time()
    for text in tqdm(texts, desc="token index", disable=not progress):
        ids = source.tokenize(text)[:max_tokens]
        hidden = wire(source.hidden_states(ids, bridge.cfg.source_layer).float(), "bfloat16")
        _, near = bridge.nearest(bridge.mapped(hidden), per_row)
        for t, row in zip(ids.tolist(), near.tolist()):
            seen.setdefault(t, set()).update(row)
        n_rows += len(ids)
    vocab_size = len(source.tok)
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for t, r in seen.items():
        counts[t] = len(r)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    rows = torch.tensor([r for t in sorted(seen) for r in sorted(seen[t])], dtype=torch.int32)
    stats = {"texts": len(texts), "rows": n_rows, "tokens_listed": len(seen), "source_vocab": vocab_size,
             "mean_candidates": round(len(rows) / max(1, len(seen)), 2), "per_row": per_row,
             "seconds": round(time.time() - t0, 1)}
    return offsets, rows, stats


def save(path: str | Path, offsets: torch.Tensor, rows: torch.Tensor, bridge, data: dict) -> dict:
    return weights.save(path, {"offsets": offsets.long(), "rows": rows.int()}, kind=KIND,
                        config={"bridge_id": bridge.bridge_id, "bridge_sha256": bridge.sha256,
                                "vocab_rows": int(bridge.vocab.shape[0])}, data=data)


def load(path: str | Path, bridge) -> tuple[torch.Tensor, torch.Tensor]:
    """The index at `path` (sha-verified), refused unless it was built for this very bridge."""
    tensors, man = weights.load(path, kind=KIND)
    want = man["config"]["bridge_sha256"]
    if want != bridge.sha256:
        raise ValueError(f"token index {path} was built for bridge sha256 {want[:12]}..., not "
                         f"{bridge.sha256[:12]}...: rebuild it (latentwire bridge index)")
    offsets, rows = tensors["offsets"].long(), tensors["rows"].long()
    if len(rows) and int(rows.max()) >= bridge.vocab.shape[0]:
        raise ValueError(f"token index {path} lists rows past the bridge's {bridge.vocab.shape[0]}")
    return offsets, rows
