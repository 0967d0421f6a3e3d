"""The target-side objective shared by training and evaluation: answer NLL given a payload.

Each row of a batch is built by `AgentModel.target_inputs(payload, question)`, the very function
serving calls before generating, so the primer, chat template, BOS and question suffix cannot
drift between training, evaluation and serving. Rows are right-padded with an explicit attention
mask and positions 0..n-1 (what `AgentModel.generate` uses), then the teacher-forced answer
tokens follow. Logits are computed only at the positions the loss needs (the LM head of Gemma 3
alone is 262k x 640), which is most of the speed of a CPU training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentwire.runtime import AgentModel


def answer_ids(target: AgentModel, answer: str) -> torch.Tensor:
    """Tokens of the answer as the target would write them after the prompt's "Answer:".

    Only the answer itself is scored (no stop token): the NLL then measures whether the facts
    arrived, not the target's punctuation habits, and transfer ratios stay comparable.
    """
    return target.tokenize(" " + answer.strip())


@dataclass
class TargetBatch:
    embeds: torch.Tensor  # (B, L, d) prompt + answer, right-padded
    attention_mask: torch.Tensor  # (B, L), 1 = real
    position_ids: torch.Tensor  # (B, L)
    prompt_lens: list[int]  # length of each row's target_inputs (prompt incl. payload)
    label_rows: torch.Tensor  # (N,) batch row of each answer token
    label_pos: torch.Tensor  # (N,) position whose logits predict it
    labels: torch.Tensor  # (N,) answer token ids


def build_batch(target: AgentModel, payloads: list, questions: list[str], answers: list[str]) -> TargetBatch:
    """payloads: per item soft tokens (K, d) [differentiable] | message str | context str | None."""
    rows, prompt_lens, lab_rows, lab_pos, labels = [], [], [], [], []
    for b, (payload, question, answer) in enumerate(zip(payloads, questions, answers)):
        prompt = target.target_inputs(payload, question)[0]
        ans = answer_ids(target, answer)
        with torch.no_grad():
            ans_emb = target.embed(ans[None])[0]
        n = prompt.shape[0]
        rows.append(torch.cat([prompt, ans_emb.to(prompt.dtype)], 0))
        prompt_lens.append(n)
        lab_rows += [b] * len(ans)
        lab_pos += list(range(n - 1, n - 1 + len(ans)))  # logits at t predict token t+1
        labels.append(ans)
    L = max(r.shape[0] for r in rows)
    d = rows[0].shape[-1]
    embeds = rows[0].new_zeros(len(rows), L, d)
    mask = torch.zeros(len(rows), L, dtype=torch.long, device=embeds.device)
    for b, r in enumerate(rows):
        embeds[b, : r.shape[0]] = r
        mask[b, : r.shape[0]] = 1
    pos = torch.arange(L, device=embeds.device).expand(len(rows), L)
    dev = embeds.device
    return TargetBatch(embeds, mask, pos, prompt_lens, torch.tensor(lab_rows, device=dev),
                       torch.tensor(lab_pos, device=dev), torch.cat(labels).to(dev))


def answer_logits(target: AgentModel, batch: TargetBatch) -> torch.Tensor:
    """(N, V) logits at the label positions only: decoder once, LM head on N rows."""
    model = target.model
    hidden = model.model(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden[batch.label_rows, batch.label_pos])
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # what Gemma's forward does after the LM head
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def answer_nll(target: AgentModel, batch: TargetBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL over all answer tokens, per-item mean NLL (B,))."""
    logits = answer_logits(target, batch)
    tok_nll = F.cross_entropy(logits, batch.labels, reduction="none")
    B = len(batch.prompt_lens)
    per_item = torch.zeros(B, device=tok_nll.device).index_add(0, batch.label_rows, tok_nll)
    counts = torch.zeros(B, device=tok_nll.device).index_add(0, batch.label_rows, torch.ones_like(tok_nll))
    per_item = per_item / counts
    return per_item.mean(), per_item
